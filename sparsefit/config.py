"""Validated, JSON-serialisable configuration of a fit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import SparsefitError

CONFIG_VERSION = 5  # 2: FitConfig.grow; 3: FitConfig.sweeps; 4: sweeps=None (as many as the steps' cost) the default;
# 5: FitConfig.rounds and round_steps

C = TypeVar("C", bound="VersionedConfig")


def _plain(value: Any) -> Any:
    """JSON-ready form of a config field: nested configs and dataclasses as dicts, tuples as lists."""
    if isinstance(value, VersionedConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class VersionedConfig:
    """The one to/from-dict of sparsefit's frozen config dataclasses.

    ``to_dict`` writes every field (nested configs as dicts, tuples as lists) plus ``"version"``;
    ``from_dict`` is strict: unknown keys and versions newer than :attr:`VERSION` raise
    :class:`SparsefitError`, older versions go through :meth:`upgrade`, and the dataclass's own
    ``__post_init__`` validates (and converts lists back to tuples, dicts to nested configs).
    """

    KIND: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        d["version"] = self.VERSION
        return d

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """Rewrite a dict written at an older ``version`` into the current keys (none so far)."""
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise SparsefitError(f"a {cls.KIND} must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not (1 <= version <= cls.VERSION):
            raise SparsefitError(
                f"{cls.KIND} version {version!r} is not supported (this sparsefit reads 1 to {cls.VERSION}); upgrade sparsefit"
            )
        d = cls.upgrade(d, version)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise SparsefitError(f"unknown {cls.KIND} keys: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class Phase:
    """A stretch of the schedule: ``fraction`` of the steps at learning rate ``lr`` and
    orthogonality-regulariser weight ``reg``."""

    fraction: float
    lr: float
    reg: float

    def __post_init__(self) -> None:
        if not (0 < self.fraction <= 1) or not math.isfinite(self.fraction):
            raise SparsefitError(f"phase fraction must be in (0, 1], got {self.fraction}")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise SparsefitError(f"learning rate must be positive, got {self.lr}")
        if not (self.reg >= 0) or not math.isfinite(self.reg):
            raise SparsefitError(f"regulariser weight must be >= 0, got {self.reg}")


def paper_schedule(lr: float = 1e-2) -> tuple[Phase, ...]:
    """The note's three phases: 7/12 at ``lr`` with reg 3, 3/12 with reg 0.3, 2/12 at ``lr/10``."""
    return (Phase(7 / 12, lr, 3.0), Phase(3 / 12, lr, 0.3), Phase(2 / 12, lr / 10, 0.3))


def _geometric(start: float, stop: float, count: int) -> list[float]:
    """``count`` values from ``start`` to ``stop``, evenly spaced on a log scale."""
    if count == 1:
        return [start]
    return [start * (stop / start) ** (i / (count - 1)) for i in range(count)]


def _cosine(start: float, stop: float, count: int) -> list[float]:
    """``count`` piecewise-constant samples (phase midpoints) of a cosine decay from ``start`` to ``stop``."""
    return [stop + 0.5 * (start - stop) * (1 + math.cos(math.pi * (i + 0.5) / count)) for i in range(count)]


def anneal_schedule(lr: float = 1e-2, pieces: int = 12) -> tuple[Phase, ...]:
    """Regulariser annealed geometrically from 3 to 0.03 over the first 10/12 of the steps (in
    ``pieces − 2`` equal phases) at ``lr``, then 2/12 at ``lr/10`` with reg 0.03. No sudden
    release of the orthogonality constraint, so no stall after it."""
    regs = _geometric(3.0, 0.03, pieces - 2)
    body = [Phase(10 / 12 / (pieces - 2), lr, r) for r in regs]
    return (*body, Phase(2 / 12, lr / 10, 0.03))


def cosine_schedule(lr: float = 1e-2, pieces: int = 12) -> tuple[Phase, ...]:
    """The note's regulariser phases (3 for 7/12, then 0.3) with a cosine learning-rate decay from
    ``lr`` to ``lr/100`` (``pieces`` equal piecewise-constant phases)."""
    lrs = _cosine(lr, lr / 100, pieces)
    return tuple(Phase(1 / pieces, lr_i, 3.0 if (i + 0.5) / pieces < 7 / 12 else 0.3) for i, lr_i in enumerate(lrs))


def anneal_cosine_schedule(lr: float = 1e-2, pieces: int = 12) -> tuple[Phase, ...]:
    """Both: regulariser annealed geometrically from 3 to 0.03 and learning rate cosine-decayed from
    ``lr`` to ``lr/100`` (``pieces`` equal phases)."""
    regs = _geometric(3.0, 0.03, pieces)
    lrs = _cosine(lr, lr / 100, pieces)
    return tuple(Phase(1 / pieces, lr_i, r) for lr_i, r in zip(lrs, regs, strict=True))


def hold_anneal_schedule(lr: float = 1e-2, pieces: int = 6) -> tuple[Phase, ...]:
    """The note's hold, then ``anneal``'s release: reg 3 for 7/12 of the steps at ``lr``, then reg
    annealed geometrically to 0.03 over 3/12 (in ``pieces`` equal phases), then 2/12 at ``lr/10``
    with reg 0.03. Holding the orthogonality penalty pushes back the depth past which deep fits
    fail (``docs/quality.md`` §7); ending it weak lowers the error below that depth."""
    regs = _geometric(3.0, 0.03, pieces + 1)[1:]
    return (Phase(7 / 12, lr, 3.0), *(Phase(3 / 12 / pieces, lr, r) for r in regs), Phase(2 / 12, lr / 10, 0.03))


def low_reg_schedule(lr: float = 1e-2) -> tuple[Phase, ...]:
    """The note's phase lengths with a ten times weaker regulariser (0.3, then 0.03)."""
    return (Phase(7 / 12, lr, 0.3), Phase(3 / 12, lr, 0.03), Phase(2 / 12, lr / 10, 0.03))


#: Schedule name -> function ``(lr) -> phases``. ``paper`` is the note's protocol (the default);
#: the others were compared against it in ``docs/quality.md``.
SCHEDULES = {
    "paper": paper_schedule,
    "anneal": anneal_schedule,
    "cosine": cosine_schedule,
    "anneal-cosine": anneal_cosine_schedule,
    "hold-anneal": hold_anneal_schedule,
    "low-reg": low_reg_schedule,
}

#: The most depth doublings ``FitConfig.grow`` may ask for.
MAX_GROW = 6
#: Regulariser weight of the stages after a depth doubling (see :func:`growth_phases`).
GROW_REG = 0.03


def growth_phases(lr: float = 1e-2) -> tuple[Phase, ...]:
    """The schedule of each stage after a depth doubling (``FitConfig.grow``): 3/4 of its steps at
    ``lr``, then 1/4 at ``lr/10``, both with the weak regulariser :data:`GROW_REG`. The doubled
    operator starts as the previous stage's matrix (identity layers inserted), so there is no
    orthogonal start to hold on to; at 256 × 256 the second stage's error moved by at most 0.03
    between reg 0 and 0.3 (``docs/quality.md`` §7)."""
    return (Phase(3 / 4, lr, GROW_REG), Phase(1 / 4, lr / 10, GROW_REG))


#: How the blocks start: ``random`` orthogonal (the note's), or ``butterfly`` (the closed-form
#: hierarchical factorisation of :mod:`sparsefit.butterfly`; needs the butterfly sampler, a
#: power-of-two width and the dense target).
INITS = ("random", "butterfly")

#: The training loss: ``probes`` (the note's: fresh N(0, I) probes each step), ``exact`` (the
#: whole ``||G~ − A||²_F / out`` each step, through the scaled identity as probes; a batch of
#: ``in_features`` columns, exact gradients, no probe noise), ``late-exact`` (probes, then the
#: exact loss over the schedule's last phase: probe noise while the structure forms, none while
#: the low learning rate settles it), or ``auto``: exact when the target has at most ``batch``
#: columns (then it costs no more than a batch of probes) and no custom probes are given, else
#: probes.
LOSSES = ("auto", "probes", "exact", "late-exact")

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class FitConfig(VersionedConfig):
    """How to fit G~ to a target.

    Defaults run the note's protocol — 12000 online Adam steps on fresh Gaussian probes, batch
    1024, the three-phase ``paper`` schedule (lr 1e-2 with reg 3 for 7/12 of the steps, reg 0.3
    for 3/12, lr 1e-3 for the last 2/12), width ``2·max(out, in)`` — then least-squares sweeps
    that cost no more than the steps did (``sweeps=0`` is the note's protocol alone).

    ``depth=None`` means ``2·ceil(log2 width)``; ``width=None`` means ``2·max(out, in)``.
    ``phases`` overrides ``schedule`` and ``lr`` when given. ``init`` (``random`` or
    ``butterfly``, see :data:`INITS`) picks the starting blocks and ``loss`` (``probes`` or
    ``exact``, see :data:`LOSSES`) the training loss; ``steps=0`` keeps a closed-form init as it is.
    ``polish``: L-BFGS iterations on the exact loss after the Adam steps (0: none).
    ``sweeps``: least-squares sweeps on the exact loss after that (each layer's blocks solved in
    turn, see :mod:`sparsefit.als`; 0: none); they stop early once a sweep gains
    less than 0.01 %. A number needs a width of at most :data:`sparsefit.als.ALS_MAX_WIDTH` and no
    custom probes; ``None`` (the default) means :meth:`resolved_sweeps`: as many as cost no more
    than the Adam steps, up to 15, and none with custom probes or above that width.
    ``rounds``: the sweeps run in this many rounds (at most one per sweep), with ``round_steps``
    Adam steps on the sweeps' loss between two rounds (fresh optimiser state, the last phase's
    learning rate, no regulariser): the steps move all layers at once, which the sweeps cannot,
    and the sweeps after them go further (``docs/quality.md`` §14). The best blocks seen at the
    end of a round are kept. ``None`` (the default) means a round per
    :data:`sparsefit.als.SWEEPS_PER_ROUND` sweeps; 1 runs the sweeps back to back.
    ``grow``: depth doublings. With ``grow = g`` the fit runs in ``g + 1`` stages of equal steps:
    the first at depth ``ceil(depth / 2^g)`` with the schedule, each next one at twice the depth
    (identity layers inserted, the matrix unchanged, see :func:`sparsefit.operator.extend_operator`)
    with :func:`growth_phases`, the last at ``depth``. 0: one stage, the note's protocol.
    """

    depth: int | None = None
    width: int | None = None
    steps: int = 12000
    batch: int = 1024
    lr: float = 1e-2
    schedule: str = "paper"
    phases: tuple[Phase, ...] | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    sampler: str = "uniform"
    backend: str = "auto"
    eval_every: int = 100
    init: str = "random"
    loss: str = "probes"
    polish: int = 0
    grow: int = 0
    sweeps: int | None = None
    rounds: int | None = None
    round_steps: int = 200

    KIND: ClassVar[str] = "fit config"
    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.depth is not None and self.depth < 1:
            raise SparsefitError(f"depth must be at least 1, got {self.depth}")
        if self.width is not None and (self.width < 2 or self.width % 2):
            raise SparsefitError(f"width must be an even number >= 2, got {self.width}")
        if self.init not in INITS:
            raise SparsefitError(f"unknown init {self.init!r}; choose one of: {', '.join(INITS)}")
        if self.init == "butterfly" and self.sampler != "butterfly":
            raise SparsefitError("the butterfly init needs butterfly permutations; add --permutations butterfly")
        if self.loss not in LOSSES:
            raise SparsefitError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.steps < 0 or (self.steps == 0 and self.init == "random"):
            raise SparsefitError(
                f"steps must be at least 1 (0 only with a closed-form init, to keep it as is), got {self.steps}"
            )
        if self.batch < 1:
            raise SparsefitError(f"batch must be at least 1, got {self.batch}")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise SparsefitError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES and self.phases is None:
            raise SparsefitError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise SparsefitError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise SparsefitError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from .kernels import parse_backend

        object.__setattr__(self, "backend", parse_backend(self.backend).value)  # "numba" (old name) -> "cpu"
        if self.polish < 0:
            raise SparsefitError(f"polish must be >= 0 L-BFGS iterations, got {self.polish}")
        if self.sweeps is not None and (
            isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or self.sweeps < 0
        ):
            raise SparsefitError(f"sweeps must be a whole number >= 0 of least-squares sweeps, got {self.sweeps!r}")
        for name in ("rounds", "round_steps"):
            value = getattr(self, name)
            if value is None and name == "rounds":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SparsefitError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if isinstance(self.grow, bool) or not isinstance(self.grow, int) or not (0 <= self.grow <= MAX_GROW):
            raise SparsefitError(
                f"grow must be a whole number of depth doublings from 0 to {MAX_GROW}, got {self.grow!r}"
            )
        if self.grow and self.init != "random":
            raise SparsefitError(
                "--grow starts from a shallower random operator; it cannot be combined with --init butterfly"
            )
        if self.grow and self.steps < self.grow + 1:
            raise SparsefitError(
                f"--grow {self.grow} needs at least {self.grow + 1} steps (one per stage), got {self.steps}"
            )
        if self.eval_every < 1:
            raise SparsefitError(f"eval_every must be at least 1, got {self.eval_every}")
        if self.seed < 0:
            raise SparsefitError(f"seed must be >= 0, got {self.seed}")
        if self.phases is not None:
            phases = tuple(p if isinstance(p, Phase) else Phase(**p) for p in self.phases)
            object.__setattr__(self, "phases", phases)
            if not phases or abs(sum(p.fraction for p in phases) - 1.0) > 1e-6:
                raise SparsefitError("schedule phase fractions must sum to 1")
        from .permutations import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise SparsefitError(f"unknown permutation sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")

    def resolve_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """``(width, depth)`` for a target of this shape: the one place the defaults are applied
        (width ``2·max(out, in)``, depth ``2·ceil(log2 width)``)."""
        from .operator import default_width

        width = self.width if self.width is not None else default_width(out_features, in_features)
        return width, resolve_depth(self.depth, width)

    def resolved_loss(self, in_features: int, custom_probes: bool = False) -> str:
        """``probes``, ``exact`` or ``late-exact``: what ``loss`` means for a target with
        ``in_features`` columns."""
        if self.loss != "auto":
            return self.loss
        return "exact" if in_features <= self.batch and not custom_probes else "probes"

    def resolved_sweeps(self, width: int, custom_probes: bool = False) -> int:
        """The number of sweeps ``sweeps`` means at this width (see the class docstring)."""
        if self.sweeps is not None:
            return self.sweeps
        from .als import affordable_sweeps

        return 0 if custom_probes else affordable_sweeps(width, self.steps, self.batch)

    def sweep_rounds(self, sweeps: int) -> list[int]:
        """The sweeps of each round when ``sweeps`` run: split as evenly as possible over
        ``rounds`` rounds (``None``: one per :data:`sparsefit.als.SWEEPS_PER_ROUND` sweeps), at
        most one round per sweep, the longer rounds first."""
        from .als import SWEEPS_PER_ROUND

        wanted = -(-sweeps // SWEEPS_PER_ROUND) if self.rounds is None else self.rounds
        rounds = max(1, min(wanted, sweeps))
        return [sweeps // rounds + (r < sweeps % rounds) for r in range(rounds)]

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """Before version 4 an absent ``sweeps`` meant none (version 3 always wrote it); before
        version 5 the sweeps ran in one round."""
        if version < 4:
            d.setdefault("sweeps", 0)
        if version < 5:
            d.setdefault("rounds", 1)
        return d

    def resolved_phases(self) -> tuple[Phase, ...]:
        return self.phases if self.phases is not None else SCHEDULES[self.schedule](self.lr)

    def _stage_bounds(self) -> list[int]:
        """The first step of each of the ``grow + 1`` stages, then ``steps``."""
        return [round(i * self.steps / (self.grow + 1)) for i in range(self.grow + 2)]

    def stage_steps(self, depth: int) -> list[tuple[int, int]]:
        """``(first_step, depth)`` of each stage (one without ``grow``): stage ``i`` of ``g + 1``
        starts at step ``round(i·steps / (g + 1))`` at depth ``ceil(depth / 2^(g − i))``."""
        g = self.grow
        return [(first, max(1, math.ceil(depth / 2 ** (g - i)))) for i, first in enumerate(self._stage_bounds()[:-1])]

    def phase_steps(self) -> list[tuple[int, Phase]]:
        """``(first_step, phase)`` for each phase, boundaries rounded to whole steps: the schedule
        over the first stage, then :func:`growth_phases` over each later one (see ``grow``)."""
        bounds = self._stage_bounds()
        out = []
        for i in range(self.grow + 1):
            phases = self.resolved_phases() if i == 0 else growth_phases(self.lr)
            acc = 0.0
            for p in phases:
                out.append((bounds[i] + round(acc * (bounds[i + 1] - bounds[i])), p))
                acc += p.fraction
        return out

    def replace(self, **changes: Any) -> FitConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, with the schedule written out as its phases (so the file says what ran)."""
        d = super().to_dict()
        d["phases"] = [dataclasses.asdict(p) for p in self.resolved_phases()]
        return d


def resolve_depth(depth: int | None, width: int) -> int:
    """``depth`` or, when None, ``2·ceil(log2 width)``."""
    return depth if depth is not None else 2 * max(1, math.ceil(math.log2(width)))
