"""Reproduce the note's experiments (Liao, section 5): error of G~ against its parameter count.

Four target classes — random rank-k (Fig. 1), band / convolution with k bands (Fig. 2), sparse
with k·size entries (Fig. 3), permutation (Fig. 4) — for k = 1…5, and a sweep over the depth N
(parameters 2·width·N). Beside them: the dense Gaussian reference (the figures' black line:
an N(0, 1/size) matrix, which no small G~ can fit) and the truncated SVD with the same number
of parameters (``FitMetrics.svd_relative_error``).

Writes ``results.csv`` (every fit), ``results.md`` (a table per experiment) and, when matplotlib
is installed (``pip install 'sparsefit[plot]'``), ``errors.png`` into ``--out``.

The note's setting is size 1024 (width 2048), 12000 steps, batch 1024 — a GPU job:

    python examples/reproduce_paper.py --size 1024 --steps 12000 --batch 1024 --depths 6,8,10,12,16,20,24,32,40

On a 2-core CPU use the reduced default (size 128, width 256):

    python examples/reproduce_paper.py --size 128 --steps 3000 --depths 4,6,8,12,16,24
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import sparsefit

EXPERIMENTS = ("lowrank", "band", "sparse", "perm")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(args: argparse.Namespace, log=print, on_row=None) -> list[dict]:
    """Every fit of the sweep, as rows (experiment, k, depth, params, errors, seconds);
    ``on_row(rows)`` is called after each fit (the CLI rewrites ``results.csv`` there, so a long
    sweep that is stopped keeps the fits it finished)."""
    jobs: list[tuple[str, int]] = []
    for exp in args.experiments.split(","):
        if exp not in EXPERIMENTS:
            raise SystemExit(f"unknown experiment {exp!r}; choose from {', '.join(EXPERIMENTS)}")
        jobs += [(exp, 1)] if exp == "perm" else [(exp, k) for k in parse_ints(args.ks)]
    if not args.no_reference:
        jobs.append(("gaussian", 0))
    rows = []
    for kind, k in jobs:
        a = sparsefit.synth(kind, size=args.size, k=max(k, 1), seed=args.seed)
        for depth in parse_ints(args.depths):
            config = sparsefit.FitConfig(
                depth=depth,
                steps=args.steps,
                batch=args.batch,
                schedule=args.schedule,
                loss=args.loss,
                seed=args.seed,
                backend=args.backend,
                device=args.device,
                sweeps=0,  # the note's protocol: Adam steps only
            )
            t0 = time.perf_counter()
            m = sparsefit.fit(a, config).metrics
            row = {
                "experiment": kind,
                "k": k if kind not in ("perm", "gaussian") else "",
                "size": args.size,
                "width": m.width,
                "depth": depth,
                "params": m.params,
                "dense_params": m.dense_params,
                "relative_error": m.relative_error,
                "mse_last": m.mse_last,
                "svd_rank": m.svd_rank,
                "svd_relative_error": m.svd_relative_error,
                "steps": args.steps,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log(
                f"{kind:8s} k={row['k']!s:1s} depth {depth:3d} ({m.params:>8,} params): error "
                f"{m.relative_error:.4g}, SVD {m.svd_relative_error:.4g}  [{row['seconds']:.1f} s]"
            )
    return rows


def write_csv(rows: list[dict], out: Path) -> None:
    """``out/results.csv`` with every row so far (written to a temporary file, then renamed)."""
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "results.csv")


def markdown(rows: list[dict]) -> str:
    """One table per experiment: rows are k, columns depth (parameters); cells 'error (SVD)'."""
    depths = sorted({r["depth"] for r in rows})
    out = []
    for exp in [*EXPERIMENTS, "gaussian"]:
        sel = [r for r in rows if r["experiment"] == exp]
        if not sel:
            continue
        params = {r["depth"]: r["params"] for r in sel}
        out.append(f"### {exp}\n")
        out.append("| k | " + " | ".join(f"N={d} ({params.get(d, 0):,})" for d in depths) + " |")
        out.append("|---|" + "---|" * len(depths))
        for k in sorted({r["k"] for r in sel}, key=str):
            cells = []
            for d in depths:
                hit = [r for r in sel if r["k"] == k and r["depth"] == d]
                cells.append(f"{hit[0]['relative_error']:.3g} ({hit[0]['svd_relative_error']:.3g})" if hit else "—")
            out.append(f"| {k if k != '' else '—'} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: relative error ‖G~ − A‖_F/‖A‖_F of the fit (truncated SVD with the same parameters).")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """errors.png: one panel per experiment, error against parameters (log-log). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    exps = [e for e in EXPERIMENTS if any(r["experiment"] == e for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(exps)), figsize=(4.2 * max(1, len(exps)), 3.6), squeeze=False)
    ref = sorted((r for r in rows if r["experiment"] == "gaussian"), key=lambda r: r["params"])
    for ax, exp in zip(axes[0], exps, strict=False):
        sel = [r for r in rows if r["experiment"] == exp]
        for k in sorted({r["k"] for r in sel}, key=str):
            line = sorted((r for r in sel if r["k"] == k), key=lambda r: r["params"])
            x = [r["params"] for r in line]
            ax.plot(x, [r["relative_error"] for r in line], "o-", color="tab:red", alpha=0.4 + 0.12 * (k or 5))
            ax.plot(x, [r["svd_relative_error"] for r in line], ":", color="tab:blue", alpha=0.5)
        if ref:
            ax.plot([r["params"] for r in ref], [r["relative_error"] for r in ref], "k-", label="dense Gaussian")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(exp)
        ax.set_xlabel("parameters")
        ax.set_ylabel("relative error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="target size (the note's: 1024)")
    ap.add_argument("--steps", type=int, default=3000, help="Adam steps per fit (the note's: 12000)")
    ap.add_argument("--batch", type=int, default=256, help="probes per step (the note's: 1024)")
    ap.add_argument("--depths", default="4,6,8,12,16,24", help="comma-separated depths N")
    ap.add_argument("--ks", default="1,2,3,4,5", help="difficulty k for lowrank, band and sparse")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--schedule", default=sparsefit.FitConfig().schedule)
    ap.add_argument("--loss", default=sparsefit.FitConfig().loss, help="probes, exact or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-reference", action="store_true", help="skip the dense Gaussian reference")
    ap.add_argument("--out", default="reproduce_out", help="output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=lambda r: write_csv(r, out))
    table = markdown(rows)
    (out / "results.md").write_text(table)
    print(table)
    drew = plot(rows, out / "errors.png")
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {out / 'errors.png'}" if drew else ""))


if __name__ == "__main__":
    main()
