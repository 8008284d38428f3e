"""The "goldilocks" depth: relative error of G~ against its depth, at two step budgets.

If the error rises past some depth because deep products are harder to *optimise* (not because
they express the target worse), a longer run moves the best depth to the right and lowers the
deep end of the curve; if the deep fits were worse because a deep random product behaves like a
dense parameterisation (the note's hypothesis), more steps would not help them. The script fits
every (target, depth, steps) cell with :func:`sparsefit.fit`, writes JSON and, with matplotlib,
a PNG (error against parameters, truncated SVD at the same budget beside it):

    python benchmarks/bench_goldilocks.py --size 256 --depths 6,9,12,16,20,24,32,48,64 \\
        --steps 1000,4000 --targets band3,sparse3 --json out.json --png docs/goldilocks.png

``--grow 0,1`` adds the same fits grown from half the depth (``FitConfig.grow``) beside each curve;
``--plot a.json,b.json --png out.png`` draws earlier runs together (e.g. two schedules):

    python benchmarks/bench_goldilocks.py --plot benchmarks/results/goldilocks_grow_256.json,\
benchmarks/results/goldilocks_grow_paper_256.json --png docs/goldilocks_grow.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench_quality import TARGETS  # benchmarks/ is on the path when run as a script

import sparsefit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depths", default="6,9,12,16,20,24,32,48,64")
    ap.add_argument("--steps", default="1000,4000", help="comma-separated step budgets")
    ap.add_argument("--targets", default="band3,sparse3")
    ap.add_argument("--schedule", default="anneal")
    ap.add_argument("--loss", default="exact")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--grow", default="0", help="comma-separated depth doublings (FitConfig.grow) to compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument(
        "--plot", default=None, help="comma-separated JSON files of earlier runs: plot them together, fit nothing"
    )
    args = ap.parse_args(argv)
    if args.plot:
        rows = [r for path in args.plot.split(",") for r in json.load(open(path))]
        plot(rows, args.png or "goldilocks.png")
        return
    rows = []
    for name in args.targets.split(","):
        kind, k = TARGETS[name]
        a = sparsefit.synth(kind, size=args.size, k=k, seed=args.seed)
        for steps, grow in ((int(s), int(g)) for s in args.steps.split(",") for g in args.grow.split(",")):
            for depth in (int(d) for d in args.depths.split(",")):
                cfg = sparsefit.FitConfig(
                    depth=depth,
                    steps=steps,
                    batch=args.batch,
                    schedule=args.schedule,
                    loss=args.loss,
                    seed=args.seed,
                    grow=grow,
                    sweeps=0,  # the schedule's own depth curve, no least-squares sweeps
                )
                t0 = time.perf_counter()
                m = sparsefit.fit(a, cfg).metrics
                row = dict(
                    target=name,
                    size=args.size,
                    width=m.width,
                    depth=depth,
                    params=m.params,
                    steps=steps,
                    grow=grow,
                    schedule=args.schedule,
                    loss=args.loss,
                    seed=args.seed,
                    relative_error=m.relative_error,
                    svd_relative_error=m.svd_relative_error,
                    seconds=round(time.perf_counter() - t0, 2),
                )
                rows.append(row)
                print(
                    f"{name} steps {steps} grow {grow} depth {depth}: "
                    f"{m.relative_error:.4g} (SVD {m.svd_relative_error:.4g})",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json:  # rewritten after every fit, so a long sweep can be read while it runs
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=2)
    if args.png:
        plot(rows, args.png)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, name in zip(axes[0], targets, strict=True):
        sel = [r for r in rows if r["target"] == name]
        curves = sorted({(r["schedule"], r["steps"], r.get("grow", 0)) for r in sel})
        for schedule, steps, grow in curves:
            pts = sorted(
                (r["params"], r["relative_error"])
                for r in sel
                if (r["schedule"], r["steps"], r.get("grow", 0)) == (schedule, steps, grow)
            )
            label = f"G~, {schedule}, {steps} steps" + (f", grown ({grow} doubling{'s' * (grow > 1)})" if grow else "")
            ax.plot(*zip(*pts, strict=True), "o-" if not grow else "s--", label=label)
        svd = sorted({(r["params"], r["svd_relative_error"]) for r in sel})
        ax.plot(*zip(*svd, strict=True), "k--", label="truncated SVD, same parameters")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (2 · width · depth)")
        ax.set_ylabel("relative error ||G~ − A||_F / ||A||_F")
        ax.set_title(f"{name}, {sel[0]['size']}×{sel[0]['size']}, {sel[0]['loss']} loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
