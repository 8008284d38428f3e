"""Fit quality table: relative error of G~ on the note's four target classes at fixed depths.

For every target (``perm``, ``sparse3``, ``band3``, ``lowrank3``: kind and k), depth, schedule,
loss and seed it fits G~ with :func:`sparsefit.fit` and prints a table of relative errors with the
truncated-SVD error at the same parameter budget in brackets (the baseline from
:func:`sparsefit.metrics.svd_baseline`, the one the tests use). ``--csv``/``--json`` write every
row. The issue's table is size 1024, depth 24 and 40, 3000 steps; on a 2-core CPU use a reduced
size, e.g.

    python benchmarks/bench_quality.py --size 128 --steps 3000 --batch 256
    python benchmarks/bench_quality.py --size 128 --depths 16 --steps 2000 --schedules paper,anneal,cosine
    python benchmarks/bench_quality.py --size 1024 --depths 24,40 --steps 3000 --batch 1024   # GPU
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import sys
import time

import numpy as np

import sparsefit
from sparsefit.config import SCHEDULES, FitConfig
from sparsefit.fileformat import atomic_output
from sparsefit.permutations import SAMPLERS

TARGETS = {"perm": ("perm", 1), "sparse3": ("sparse", 3), "band3": ("band", 3), "lowrank3": ("lowrank", 3)}


def run_one(
    name: str, size: int, depth: int, args: argparse.Namespace, schedule: str, loss: str, seed: int, lr: float
) -> dict:
    kind, k = TARGETS[name]
    a = sparsefit.synth(kind, size=size, k=k, seed=seed)
    config = sparsefit.FitConfig(
        depth=depth,
        width=args.width,
        steps=args.steps,
        batch=args.batch,
        schedule=schedule,
        lr=lr,
        loss=loss,
        seed=seed,
        backend=args.backend,
        device=args.device,
        polish=args.polish,
        grow=args.grow,
        sweeps=args.sweeps,
        rounds=args.rounds,
        round_steps=args.round_steps,
        sampler=args.permutations,
    )
    t0 = time.perf_counter()
    sweeps: list = []
    r = sparsefit.fit(a, config, [SweepLog(sweeps)])
    m = r.metrics
    norm2 = float(np.sum(np.asarray(a, dtype=np.float64) ** 2))
    return {
        "target": name,
        "size": size,
        "width": m.width,
        "depth": depth,
        "params": m.params,
        "schedule": schedule,
        "lr": lr,
        "loss": loss,
        "polish": args.polish,
        "grow": args.grow,
        "sweeps": r.config.sweeps,  # the count asked or, with --sweeps auto, the one fit resolved
        "rounds": len(r.config.sweep_rounds(r.config.sweeps or 0)),
        "round_steps": args.round_steps,
        "sweeps_kept": m.sweeps_run,
        "permutations": args.permutations,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "relative_error": m.relative_error,
        "svd_relative_error": m.svd_relative_error,
        "svd_rank": m.svd_rank,
        "mse_last": m.mse_last,
        "seconds": round(time.perf_counter() - t0, 2),
        "history": r.history,
        # least-squares sweeps: (sweep, relative error, seconds since they started, round); sweep 0
        # is the Adam result they start from, so one run gives the error with and without them
        "sweep_history": [
            (s.sweep, math.sqrt(s.mse * a.shape[0] / norm2), round(s.seconds, 2), s.round) for s in sweeps
        ],
    }


class SweepLog:
    def __init__(self, into: list) -> None:
        self.into = into

    def on_sweep(self, info) -> None:
        self.into.append(info)


def _count_or_auto(flag: str, minimum: int):
    """An argparse type: ``auto`` (None, the library's default) or a whole number >= ``minimum``."""

    def parse(text: str) -> int | None:
        if text == "auto":
            return None
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} takes a count >= {minimum} or 'auto'")
        return value

    return parse


def _key(r: dict) -> tuple:
    """A table row: rows differing only in seed are averaged (JSON from before ``--lrs`` has no lr)."""
    return (r["target"], r["schedule"], r["loss"], r.get("lr", FitConfig.lr))


def print_table(rows: list[dict], depths: list[int]) -> None:
    keys = list(dict.fromkeys(_key(r) for r in rows))
    head = "| target | schedule | loss | lr | " + " | ".join(f"depth {d}" for d in depths) + " |"
    print(head)
    print("|" + "---|" * (4 + len(depths)))
    for key in keys:
        cells = []
        for d in depths:
            sel = [r for r in rows if _key(r) == key and r["depth"] == d]
            if not sel:
                cells.append("—")
                continue
            err = sum(r["relative_error"] for r in sel) / len(sel)
            svd = sel[0]["svd_relative_error"]
            cells.append(f"{err:.3g} ({svd:.3g})" if svd is not None else f"{err:.3g}")
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | " + " | ".join(cells) + " |")


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v > 0 and v != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive and finite, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="target size (the issue's is 1024)")
    ap.add_argument("--width", type=int, default=None, help="internal width (default 2·size)")
    ap.add_argument("--depths", default="24,40")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--schedules", default="paper", help=f"comma-separated, from: {', '.join(SCHEDULES)}")
    ap.add_argument("--losses", default="probes", help="comma-separated: probes, exact, late-exact")
    ap.add_argument(
        "--lrs",
        type=_positive_floats,
        default=[FitConfig.lr],
        help=f"comma-separated Adam learning rates, the schedule's peak (default {FitConfig.lr:g})",
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--permutations", default="uniform", choices=sorted(SAMPLERS), help="permutation sampler")
    ap.add_argument("--polish", type=int, default=0, help="L-BFGS iterations on the exact loss at the end")
    ap.add_argument("--grow", type=int, default=0, help="depth doublings (FitConfig.grow)")
    ap.add_argument(
        "--sweeps",
        type=_count_or_auto("--sweeps", 0),
        default=0,
        help="least-squares sweeps at the end (FitConfig.sweeps); 'auto' is the library's default, "
        "as many as the steps afford",
    )
    ap.add_argument(
        "--rounds",
        type=_count_or_auto("--rounds", 1),
        default=None,
        help="rounds of sweeps (FitConfig.rounds); default/'auto': the library's",
    )
    ap.add_argument(
        "--round-steps",
        type=int,
        default=FitConfig.round_steps,
        help="Adam steps between rounds (FitConfig.round_steps)",
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    grid = itertools.product(targets, args.schedules.split(","), args.losses.split(","), args.lrs, depths, seeds)
    for name, schedule, loss, lr, depth, seed in grid:
        row = run_one(name, args.size, depth, args, schedule, loss, seed, lr)
        rows.append(row)
        print(
            f"{name:9s} {schedule:14s} {loss:6s} lr {lr:g} depth {depth:3d} seed {seed}: "
            f"error {row['relative_error']:.4g} (SVD {row['svd_relative_error']:.4g}"
            + (f", before the sweeps {row['sweep_history'][0][1]:.4g}" if row["sweep_history"] else "")
            + f") {row['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    print_table(rows, depths)
    if args.csv:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        with atomic_output(args.csv) as f:
            f.write(text.getvalue().encode())
    if args.json:
        with atomic_output(args.json) as f:
            f.write(json.dumps(rows, indent=2).encode())


if __name__ == "__main__":
    main()
