"""Compile the fused Triton kernels for sm_90 ahead of time, without a GPU (Triton's bundled ptxas).

For each width, the tile :func:`sparsefit.kernels.gpu.plan` picks at batch 4096 (fp32) is
compiled for ``GPUTarget("cuda", 90, 32)``: forward (saving activations or not) and backward.
Prints the compile time and the shared memory each kernel asks for (an H100 SM offers 227 KB), so
a tile that cannot launch, or a first call whose compile takes minutes, shows up before a GPU
session pays for it.

Usage: ``python benchmarks/aot_sm90.py --widths 1024,2048,4096 [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sparsefit.kernels import gpu  # noqa: E402
from sparsefit.kernels import gpu_triton as k  # noqa: E402

H100_SMEM = 227 * 1024
COMMON = {"B": "i32", "K": "i32", "M": "i32", "n_w": "i32", "depth": "i32"}


def compile_one(fn, signature: dict, constexprs: dict, num_warps: int) -> dict:
    t = time.perf_counter()
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return {"seconds": round(time.perf_counter() - t, 2), "shared_bytes": int(ck.metadata.shared)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="1024,2048,4096")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for n in [int(w) for w in args.widths.split(",")]:
        p = gpu.plan(n, args.batch)
        if p["mode"] != "fused":
            rows.append({"width": n, "mode": p["mode"]})
            continue
        tile = {"NP": p["NP"], "BB": p["BB"], "ACC": tl.float32}
        fwd_sig = {"x_ptr": "*fp32", "blk_ptr": "*fp32", "perm_ptr": "*i32", "y_ptr": "*fp32", "save_ptr": "*fp32",
                   **COMMON, "stride_x": "i32", "stride_y": "i32", "NP": "constexpr", "BB": "constexpr",
                   "SAVE": "constexpr", "PAIR_GATHER": "constexpr", "ACC": "constexpr"}  # fmt: skip
        bwd_sig = {"gy_ptr": "*fp32", "blk_ptr": "*fp32", "inv_ptr": "*i32", "gx_ptr": "*fp32", "v_ptr": "*fp32",
                   **COMMON, "stride_gy": "i32", "stride_gx": "i32", "NP": "constexpr", "BB": "constexpr",
                   "STORE_V": "constexpr", "STORE_X": "constexpr", "ACC": "constexpr"}  # fmt: skip
        for name, fn, sig, flags in (
            ("fwd", k.fwd_fused, fwd_sig, {"SAVE": False, "PAIR_GATHER": False}),
            ("fwd_save", k.fwd_fused, fwd_sig, {"SAVE": True, "PAIR_GATHER": False}),
            ("bwd", k.bwd_fused, bwd_sig, {"STORE_V": True, "STORE_X": True}),
        ):
            r = compile_one(fn, sig, {**tile, **flags}, p["num_warps"])
            row = {"width": n, "kernel": name, "NP": p["NP"], "BB": p["BB"], "num_warps": p["num_warps"], **r}
            row["fits_h100_smem"] = r["shared_bytes"] <= H100_SMEM
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every kernel: a long compile may be cut off
                payload = {"target": "cuda sm_90", "triton": triton.__version__, "rows": rows}
                Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
