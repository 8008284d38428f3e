"""Validated, JSON-serialisable configuration of a fit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SparsefitError

CONFIG_VERSION = 1


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


SCHEDULES = {"paper": paper_schedule}

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
FIT_BACKENDS = ("auto", "torch", "reference", "numba")


@dataclass(frozen=True)
class FitConfig:
    """How to fit G~ to a target.

    Defaults reproduce the note's protocol: 12000 online Adam steps on fresh Gaussian probes,
    batch 1024, the three-phase ``paper`` schedule (lr 1e-2 with reg 3 for 7/12 of the steps,
    reg 0.3 for 3/12, lr 1e-3 for the last 2/12), width ``2·max(out, in)``.

    ``depth=None`` means ``2·ceil(log2 width)``; ``width=None`` means ``2·max(out, in)``.
    ``phases`` overrides ``schedule`` and ``lr`` when given.
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
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.depth is not None and self.depth < 1:
            raise SparsefitError(f"depth must be at least 1, got {self.depth}")
        if self.width is not None and (self.width < 2 or self.width % 2):
            raise SparsefitError(f"width must be an even number >= 2, got {self.width}")
        if self.steps < 1:
            raise SparsefitError(f"steps must be at least 1, got {self.steps}")
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
        if self.backend not in FIT_BACKENDS:
            raise SparsefitError(f"backend must be one of {', '.join(FIT_BACKENDS)}, got {self.backend!r}")
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

    def resolved_phases(self) -> tuple[Phase, ...]:
        return self.phases if self.phases is not None else SCHEDULES[self.schedule](self.lr)

    def phase_steps(self) -> list[tuple[int, Phase]]:
        """``(first_step, phase)`` for each phase, boundaries rounded to whole steps."""
        out, acc = [], 0.0
        for p in self.resolved_phases():
            out.append((round(acc * self.steps), p))
            acc += p.fraction
        return out

    def replace(self, **changes: Any) -> FitConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phases"] = [dataclasses.asdict(p) for p in self.resolved_phases()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SparsefitError(f"unknown fit config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("phases") is not None:
            d["phases"] = tuple(Phase(**p) for p in d["phases"])
        return cls(**d)


def resolve_depth(depth: int | None, width: int) -> int:
    """``depth`` or, when None, ``2·ceil(log2 width)``."""
    return depth if depth is not None else 2 * max(1, math.ceil(math.log2(width)))
