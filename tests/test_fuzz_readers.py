"""Fuzzing every reader: damaged files end in one SparsefitError line, never a crash or a big allocation.

For each file kind a small valid file is made, then damaged: truncated at many offsets, bytes
flipped (biased towards the header), headers edited to claim oversized, negative or mismatched
sizes and wrong dtypes. All cases run in one child process (tests/_fuzz_child.py) whose address
space is capped at its size plus 512 MiB, and which measures, per case, the tracemalloc peak and
the growth of the peak resident set: each must stay below a small multiple of the file's size.

The header checkers themselves (sparsefit.headers) are pure Python and are property-tested here
with hypothesis: a header they accept never claims more bytes than the file holds.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefit import GTilde, SparsefitError
from sparsefit.calibration import save_activations
from sparsefit.fileformat import save, save_safetensors
from sparsefit.headers import mtx_header, npy_header, safetensors_header

#: Memory a case may use beyond a multiple of the file's size (interpreter and library overhead).
TRACED_SLACK = 2 << 20
TOUCHED_SLACK = 24 << 20
FILE_MULTIPLE = 16


# ----------------------------------------------------------------------------------------------
# Seed files
# ----------------------------------------------------------------------------------------------
def _st_bytes(tensors, metadata=None) -> bytes:
    import io

    from sparsefit.fileformat import write_safetensors

    f = io.BytesIO()
    write_safetensors(f, tensors, metadata)
    return f.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def _npy_claiming(shape, descr="<f8", fortran=False) -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _st_claiming(entries: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _zip(members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> bytes:
    import io

    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", compression=compress) as z:
        for k, v in members.items():
            z.writestr(k, v)
    return f.getvalue()


def _sparse_npz(fmt="csr", compressed=False, **override) -> bytes:
    import io

    m = sp.random(9, 7, density=0.3, random_state=1, format=fmt)
    f = io.BytesIO()
    sp.save_npz(f, m, compressed=compressed)
    if not override:
        return f.getvalue()
    f.seek(0)
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(override)
    return _zip({f"{k}.npy": _npy_bytes(np.asarray(v)) for k, v in arrays.items()})


def _seeds(d: Path) -> dict[str, tuple[str, bytes, list[bytes]]]:
    """name → (reader, valid file bytes, hand-made damaged variants)."""
    g = torch.Generator().manual_seed(0)
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    out: dict[str, tuple[str, bytes, list[bytes]]] = {}

    npy = _npy_bytes(a)
    huge = [(10**16,), (100000000, 100000000), (4000, 4000), (-1, 7), (5, -7), (2**62, 2**62), (5, 8), (6, 7), (0, 7)]
    out["a.npy"] = (
        "target",
        npy,
        [_npy_claiming(s).ljust(200, b"\0") for s in huge]
        + [_npy_claiming((5, 7), dt) + npy[128:] for dt in ("|O", "<U3", "<c8", "V4", "|b1", ">f4", "<M8[s]")]
        + [_npy_claiming((5, 7), [("a", "<f4")]) + npy[128:], npy[:8] + b"\xff\xff" + npy[10:]]
        + [b"\x93NUMPY\x02\x00" + b"\xff\xff\xff\x7f" + npy[10:], b"\x93NUMPY\x07\x00" + npy[8:]],
    )
    out["f.npy"] = ("npy", _npy_bytes(np.asfortranarray(a)), [])

    dense_npz = _zip({"w.npy": npy, "b.npy": _npy_bytes(a.T.copy())})
    out["keyed.npz"] = (
        "target",
        dense_npz,
        [_zip({"w.npy": _npy_claiming((10**16,)) + b"\0" * 64}), _zip({"w.npy": _npy_claiming((5, 8)) + npy[128:]})],
    )
    out["deflated.npz"] = ("target", _zip({"a.npy": npy}, zipfile.ZIP_DEFLATED), [])
    out["csr.npz"] = (
        "target",
        _sparse_npz("csr"),
        [
            _sparse_npz("csr", shape=np.array([10**12, 10**12])),
            _sparse_npz("csr", shape=np.array([9, -7])),
            _sparse_npz("csr", shape=np.array([9, 7, 1])),
            _sparse_npz("csr", indices=np.full(19, 10**6)),
            _sparse_npz("csr", indptr=np.arange(10)[::-1].copy()),
            _sparse_npz("csr", indptr=np.zeros(3, np.int32)),
            _sparse_npz("csr", format=np.array("bsr")),
            _sparse_npz("csr", format=np.array(["csr", "coo"])),
            _sparse_npz("csr", data=np.array(["x"] * 19)),
            _sparse_npz("csr", data=np.zeros((19, 2))),
        ],
    )
    out["csc.npz"] = ("target", _sparse_npz("csc", compressed=True), [])
    out["coo.npz"] = (
        "target",
        _sparse_npz("coo"),
        [
            _sparse_npz("coo", shape=np.array([10**12, 3])),
            _sparse_npz("coo", row=np.full(19, 99)),
            _sparse_npz("coo", col=np.full(19, -1)),
            _sparse_npz("coo", row=np.zeros(3, np.int64)),
        ],
    )

    st_file = _st_bytes({"w": torch.from_numpy(a), "b": torch.randn(7, generator=g)})
    ok_entry = {"w": {"dtype": "F32", "shape": [5, 7], "data_offsets": [0, 140]}}
    data = st_file[8 + struct.unpack("<Q", st_file[:8])[0] :]
    bad_entries = [
        {"w": {"dtype": "F32", "shape": [10**8, 10**8], "data_offsets": [0, 140]}},
        {"w": {"dtype": "F32", "shape": [5, 7], "data_offsets": [0, 10**15]}},
        {"w": {"dtype": "F32", "shape": [5, 7], "data_offsets": [140, 0]}},
        {"w": {"dtype": "F32", "shape": [-5, -7], "data_offsets": [0, 140]}},
        {"w": {"dtype": "F64", "shape": [5, 7], "data_offsets": [0, 140]}},
        {"w": {"dtype": "Q99", "shape": [5, 7], "data_offsets": [0, 140]}},
        {"w": {"dtype": "I32", "shape": [5, 7], "data_offsets": [0, 140]}},
        {"w": {"dtype": "F32", "shape": [35], "data_offsets": [0, 140]}},
        {"w": {"dtype": "F32", "shape": "57", "data_offsets": [0, 140]}},
        {"w": [1, 2]},
        {"__metadata__": {"a": 1}, **ok_entry},
        [ok_entry],
    ]
    out["m.safetensors"] = (
        "target",
        st_file,
        [_st_claiming(e, data) for e in bad_entries]
        + [_st_claiming(ok_entry, data, n) for n in (0, 2**63, 2**64 - 1, len(st_file), 100_000_001)]
        + [b"[" * 5000 + b"]" * 5000]
        + [struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000],
    )

    pt = d / "seed.pt"
    torch.save({"w": torch.from_numpy(a), "b": torch.randn(7, generator=g)}, pt)
    legacy = d / "legacy.pt"
    torch.save({"w": torch.from_numpy(a)}, legacy, _use_new_zipfile_serialization=False)
    out["m.pt"] = (
        "target",
        pt.read_bytes(),
        [legacy.read_bytes(), b"\x80\x04K\x01.", _zip({"archive/data.pkl": b"\x80\x02}q\x00."})]
        + [_zip({"archive/data.pkl": pt.read_bytes()[:200]}, zipfile.ZIP_DEFLATED)],
    )

    mtx = d / "seed.mtx"
    scipy.io.mmwrite(str(mtx), sp.random(9, 7, density=0.3, random_state=1, format="coo"))
    mtx_bytes = mtx.read_bytes()
    banner = b"%%MatrixMarket matrix coordinate real general\n"
    out["s.mtx"] = (
        "target",
        mtx_bytes,
        [
            banner + b"100000000 100000000 5\n1 1 1.0\n",
            banner + b"3 3 999999999999\n1 1 1.0\n",
            banner + b"3 3 -1\n",
            banner + b"3 3 2\n99 1 1.0\n1 1 2.0\n",
            banner + b"3 3 2\n0 1 1.0\n1 1 2.0\n",
            banner + b"3 3 2\n1 1 nan\n1 1 2.0\n",
            banner + b"3 3\n1 1 1.0\n",
            b"%%MatrixMarket matrix array real general\n99999 99999\n1.0\n2.0\n",
            b"%%MatrixMarket matrix array real symmetric\n4 4\n1.0\n",
            b"%%MatrixMarket matrix coordinate complex general\n2 2 1\n1 1 1.0 2.0\n",
            b"%%MatrixMarket matrix coordinate pattern general\n2 2 1\n1 1\n",
            b"%%MatrixMarket tensor coordinate real general\n2 2 1\n1 1 1\n",
        ],
    )
    dmtx = d / "seed-d.mtx"
    scipy.io.mmwrite(str(dmtx), a.astype(np.float64))
    out["d.mtx"] = ("target", dmtx.read_bytes(), [])

    op = GTilde(6, 5, 3, seed=1)
    sf = d / "seed-g.safetensors"
    save(sf, op, bias=torch.zeros(5), config={"a": 1})
    sf_bytes = sf.read_bytes()
    header = json.loads(safetensors_header(sf)["__metadata__"]["sparsefit"])
    tensors = {"blocks": op.blocks.detach(), "permutations": op.perms.to(torch.int32), "bias": torch.zeros(5)}

    def with_header(**edit):
        h = dict(header, **edit)
        return _st_bytes(tensors, {"sparsefit": json.dumps(h)})

    out["g.safetensors"] = (
        "sparsefit",
        sf_bytes,
        [
            with_header(depth=10**12),
            with_header(width=-8),
            with_header(in_features="6"),
            with_header(seed="x"),
            with_header(seed=[1]),
            with_header(permutation_sampler=7),
            with_header(format_version=10**30),
            with_header(out_features=10**9, in_features=10**9, width=2**31),
            _st_bytes(tensors, {"sparsefit": "[" * 100000}),
            _st_bytes(
                {**tensors, "permutations": torch.zeros(3, 8, dtype=torch.int32)}, {"sparsefit": json.dumps(header)}
            ),
            _st_bytes(
                {**tensors, "blocks": torch.zeros(3, 4, 2, 2, dtype=torch.int32)}, {"sparsefit": json.dumps(header)}
            ),
            _st_bytes({**tensors, "bias": torch.zeros(6, 6)}, {"sparsefit": json.dumps(header)}),
        ],
    )
    out["h.safetensors"] = ("sparsefit-header", sf_bytes, [])

    calib = d / "seed-calib.safetensors"
    save_activations(calib, {"fc1": torch.randn(8, 6, generator=g), "fc2": torch.randn(8, 4, generator=g)})
    out["calib.safetensors"] = (
        "calibration",
        calib.read_bytes(),
        [
            _st_bytes({"fc1": torch.zeros(8, 6, dtype=torch.int64)}),
            _st_bytes({"fc1": torch.full((8, 6), float("nan"))}),
            _st_bytes({"fc1": torch.zeros(8)}),
        ],
    )
    return out


def _checkpoint_folders(d: Path) -> list[tuple[Path, str]]:
    """HF-style folders, valid and damaged: (folder, what was done)."""
    g = torch.Generator().manual_seed(1)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.randn(6, 4, generator=g)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.randn(3, 6, generator=g), "b.bias": torch.zeros(3)},
    }
    index = {"metadata": {}, "weight_map": {k: f for f, t in shards.items() for k in t}}
    variants: list[tuple[str, dict, object]] = [("valid", {}, index)]
    for i, f in enumerate(shards):
        raw = _st_bytes(shards[f])
        for cut in (0, 7, 8, 30, len(raw) // 2, len(raw) - 1):
            variants.append((f"cut{i}-{cut}", {f: raw[:cut]}, index))
        rnd = random.Random(i)
        for j in range(10):
            b = bytearray(raw)
            pos = rnd.randrange(min(len(b), 160))
            b[pos] = rnd.choice((0, 0xFF, ord("9"), b[pos] ^ 0xFF))
            variants.append((f"flip{i}-{j}", {f: bytes(b)}, index))
    wm = index["weight_map"]
    for name, idx in [
        ("abs", {"weight_map": {**wm, "a.weight": "/etc/passwd"}}),
        ("dotdot", {"weight_map": {**wm, "a.weight": "../model-00001-of-00002.safetensors"}}),
        ("int", {"weight_map": {**wm, "a.weight": 5}}),
        ("list", {"weight_map": [1, 2]}),
        ("empty", {"weight_map": {}}),
        ("missing-shard", {"weight_map": {**wm, "c.weight": "model-00003-of-00003.safetensors"}}),
        ("missing-tensor", {"weight_map": {**wm, "zz": "model-00001-of-00002.safetensors"}}),
        ("deep", "[" * 100000),
        ("not-json", "{weight_map"),
        ("top-list", [1]),
    ]:
        variants.append((f"index-{name}", {}, idx))
    folders = []
    for name, override, idx in variants:
        f = d / f"ckpt-{name}"
        f.mkdir()
        (f / "config.json").write_text("{}")
        for s, t in shards.items():
            (f / s).write_bytes(override.get(s, _st_bytes(t)))
        (f / "model.safetensors.index.json").write_text(idx if isinstance(idx, str) else json.dumps(idx))
        folders.append((f, name))
    # a single pytorch_model.bin, valid and truncated
    pt_raw = d / "pt.bin"
    torch.save({"a.weight": torch.randn(6, 4, generator=g)}, pt_raw)
    raw = pt_raw.read_bytes()
    for cut in (None, 0, 100, len(raw) // 2, len(raw) - 30):
        f = d / f"ckpt-bin-{cut}"
        f.mkdir()
        (f / "config.json").write_text("{}")
        (f / "pytorch_model.bin").write_bytes(raw if cut is None else raw[:cut])
        folders.append((f, f"bin-{cut}"))
    return folders


def _compressed_folders(d: Path) -> list[Path]:
    """A compressed folder (``sparsefit compress`` of a tiny model), then copies with one file damaged."""
    import shutil

    from sparsefit.compress import CompressConfig, compress_checkpoint

    from .test_compress import FAST_CFG, tiny_state, write_sharded

    _, state = tiny_state()
    valid = d / "compressed-valid"
    compress_checkpoint(write_sharded(d / "tiny", state), valid, CompressConfig(**FAST_CFG))
    manifest = json.loads((valid / "manifest.json").read_text())
    folders = [valid]

    def variant(name: str, rel: str, data: bytes) -> None:
        f = d / f"compressed-{name}"
        shutil.copytree(valid, f)
        (f / rel).write_bytes(data)
        folders.append(f)

    def edited(**changes) -> bytes:
        return json.dumps({**manifest, **changes}).encode()

    layer0 = manifest["layers"][0]
    for name, data in [
        ("layers-dict", edited(layers={"a": 1})),
        ("layer-int", edited(layers=[5])),
        ("file-up", edited(layers=[{**layer0, "file": "../../tiny/config.json"}])),
        ("file-abs", edited(layers=[{**layer0, "file": "/etc/passwd"}])),
        ("shape", edited(layers=[{**layer0, "shape": [10**9, -1]}])),
        ("status", edited(layers=[{**layer0, "status": 3}])),
        ("dense-abs", edited(dense_files=["/etc/passwd"])),
        ("dense-missing", edited(dense_files=["nope.safetensors"])),
        ("deep", b"[" * 100000),
        ("version", edited(format_version=10**40)),
    ]:
        variant(name, "manifest.json", data)
    variant("dense-shape", manifest["dense_files"][0], _st_bytes({"head.weight": torch.zeros(3, 3)}))
    raw_manifest = (valid / "manifest.json").read_bytes()
    for j, blob in enumerate(_damaged(raw_manifest, seed=7)[::4]):
        variant(f"manifest-{j}", "manifest.json", blob)
    for rel in (layer0["file"], manifest["dense_files"][0]):
        for j, blob in enumerate(_damaged((valid / rel).read_bytes(), seed=8)[::3]):
            variant(f"{Path(rel).stem}-{j}", rel, blob)
    return folders


def _damaged(data: bytes, seed: int) -> list[bytes]:
    """Truncations at many offsets and single-byte flips (half of them in the first 256 bytes)."""
    n = len(data)
    cuts = sorted({*range(0, min(n, 17)), *(n * i // 20 for i in range(20)), *range(max(0, n - 8), n)})
    out = [data[:c] for c in cuts]
    rnd = random.Random(seed)
    for j in range(40):
        b = bytearray(data)
        pos = rnd.randrange(min(n, 256)) if j % 2 == 0 else rnd.randrange(n)
        b[pos] = (b[pos] ^ 0xFF, 0, 0xFF, ord("9"), rnd.randrange(256))[j % 5]
        out.append(bytes(b))
    out.append(data + b"\0" * 16)
    return out


# ----------------------------------------------------------------------------------------------
# One child run for every case
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    seeds = _seeds(d)
    cases: list[tuple[str, str, str]] = []  # (group, reader, path)
    for name, (reader, valid, extra) in seeds.items():
        stem, suffix = name.rsplit(".", 1)
        p = d / name
        p.write_bytes(valid)
        cases.append((name, reader, str(p)))
        for j, blob in enumerate(extra + _damaged(valid, seed=len(cases))):
            q = d / f"{stem}-{j}.{suffix}"
            q.write_bytes(blob)
            cases.append((name, reader, str(q)))
    for folder, _ in _checkpoint_folders(d):
        cases.append(("checkpoint", "checkpoint", str(folder)))
    for folder in _compressed_folders(d):
        cases.append(("compressed", "compressed", str(folder)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", PYTHONPATH=str(Path(__file__).parents[1]))
    lines: list[dict] = []
    while len(lines) < len(cases):  # a case that kills the child is recorded, and the rest go on
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("_fuzz_child.py"))],
            input=json.dumps([c[1:] for c in cases[len(lines) :]]),
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines += [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 and len(lines) < len(cases):
            why = f"the reader killed the process (rc {proc.returncode}): {proc.stderr[-2000:]}"
            lines.append({"outcome": "bug", "message": why, "traced": 0, "touched": 0})
        else:
            assert proc.returncode == 0 and len(lines) == len(cases), proc.stderr[-3000:]
    by_group: dict[str, list[tuple[str, int, dict]]] = {}
    for (group, _, path), r in zip(cases, lines, strict=True):
        size = (
            sum(f.stat().st_size for f in Path(path).rglob("*")) if Path(path).is_dir() else Path(path).stat().st_size
        )
        by_group.setdefault(group, []).append((path, size, r))
    return by_group


GROUPS = [
    "a.npy",
    "f.npy",
    "keyed.npz",
    "deflated.npz",
    "csr.npz",
    "csc.npz",
    "coo.npz",
    "m.safetensors",
    "m.pt",
    "s.mtx",
    "d.mtx",
    "g.safetensors",
    "h.safetensors",
    "calib.safetensors",
    "checkpoint",
    "compressed",
]


@pytest.mark.parametrize("group", GROUPS)
def test_damaged_files_give_one_error_line_and_little_memory(results, group):
    cases = results[group]
    assert len(cases) > 1
    first_path, _, first = cases[0]
    assert first["outcome"] == "ok", f"the valid file {first_path} was refused: {first['message']}"
    bugs = [(p, r["message"]) for p, _, r in cases if r["outcome"] == "bug"]
    assert not bugs, f"{len(bugs)} of {len(cases)} cases raised something else than SparsefitError; first: {bugs[0]}"
    for p, size, r in cases:
        if r["outcome"] == "error":
            assert "\n" not in r["message"] and r["message"], (p, r["message"])
        assert r["traced"] <= FILE_MULTIPLE * size + TRACED_SLACK, (p, size, r)
        assert r["touched"] <= FILE_MULTIPLE * size + TOUCHED_SLACK, (p, size, r)
    assert sum(r["outcome"] == "error" for _, _, r in cases) >= len(cases) // 3


# ----------------------------------------------------------------------------------------------
# Property tests of the header checkers (pure Python: safe to run in-process)
# ----------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
big_ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70))


@FUZZ
@given(
    shape=st.lists(big_ints, max_size=4).map(tuple),
    descr=st.sampled_from(["<f8", "<f4", "|u1", "<i8", "<c16", "|O", "<U5", "V0", "|S0"]),
    payload=st.integers(0, 600),
)
def test_npy_header_never_accepts_a_claim_the_file_cannot_hold(tmp_path_factory, shape, descr, payload):
    import io

    raw = _npy_claiming(shape, descr) + b"\0" * payload
    f = io.BytesIO(raw)
    try:
        got_shape, dtype, _ = npy_header(f, len(raw), "x.npy")
    except SparsefitError as e:
        assert "\n" not in str(e)
        return
    assert got_shape == shape and all(s >= 0 for s in shape)
    assert int(np.prod(shape, dtype=object)) * dtype.itemsize <= len(raw) - f.tell()


@FUZZ
@given(
    n=st.one_of(st.integers(0, 200), st.integers(0, 2**64 - 1)),
    dtype=st.sampled_from(["F32", "F64", "BF16", "BOOL", "X1", 3]),
    shape=st.lists(big_ints, max_size=3),
    offsets=st.lists(big_ints, min_size=0, max_size=3),
    data=st.integers(0, 300),
)
def test_safetensors_header_never_accepts_a_claim_the_file_cannot_hold(
    tmp_path_factory, n, dtype, shape, offsets, data
):
    p = tmp_path_factory.mktemp("st") / "x.safetensors"
    raw = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()
    p.write_bytes(struct.pack("<Q", n if n > 200 else len(raw)) + raw + b"\0" * data)
    try:
        header = safetensors_header(p)
    except SparsefitError as e:
        assert "\n" not in str(e)
        return
    b, e = header["t"]["data_offsets"]
    assert (
        0 <= b <= e <= data
        and e - b == int(np.prod(shape, dtype=object)) * {"F32": 4, "F64": 8, "BF16": 2, "BOOL": 1}[dtype]
    )


@FUZZ
@given(
    layout=st.sampled_from(["coordinate", "array", "vector"]),
    symmetry=st.sampled_from(["general", "symmetric", "skew-symmetric"]),
    dims=st.lists(big_ints, min_size=1, max_size=4),
    body=st.integers(0, 400),
)
def test_mtx_header_never_accepts_a_claim_the_file_cannot_hold(tmp_path_factory, layout, symmetry, dims, body):
    p = tmp_path_factory.mktemp("mtx") / "x.mtx"
    head = f"%%MatrixMarket matrix {layout} real {symmetry}\n% comment\n{' '.join(map(str, dims))}\n".encode()
    p.write_bytes(head + b"1 " * (body // 2))
    try:
        h = mtx_header(p)
    except SparsefitError as e:
        assert "\n" not in str(e)
        return
    per_entry = 4 if h.layout == "coordinate" else 2
    assert min(h.rows, h.cols, h.stored) >= 0 and h.stored * per_entry <= body + 1
    if h.layout == "array":
        assert h.rows * h.cols <= 2 * (body + 1) + 2 * h.rows  # a symmetric array stores the lower triangle


def test_the_seeds_are_valid(tmp_path):
    """The valid seed files really are read (so the damaged cases are damage, not a broken seed)."""
    from sparsefit.targets import load_target

    seeds = _seeds(tmp_path)
    p = tmp_path / "m.safetensors"
    save_safetensors(p, {"w": torch.zeros(2, 3)})
    assert load_target(p).shape == (2, 3)
    assert set(GROUPS) == set(seeds) | {"checkpoint", "compressed"}


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in ("f.npy", "h.safetensors", "compressed")])
def test_cli_damaged_file_is_one_line_and_exit_2(results, group):
    """A sample of the damaged files through the CLI: one ``error:`` line, exit code 2."""
    from typer.testing import CliRunner

    from sparsefit.cli import app

    damaged = [p for p, _, r in results[group] if r["outcome"] == "error"][::9][:4]
    assert damaged
    for p in damaged:
        if group == "checkpoint":
            args = ["compress", p, "-o", str(Path(p).parent / "out"), "--depth", "2", "--dry-run"]
        elif group == "calib.safetensors":
            args = [
                "compress",
                str(Path(p).parent / "ckpt-valid"),
                "-o",
                "x",
                "--depth",
                "2",
                "--dry-run",
                "--calibration",
                p,
            ]
        elif group == "g.safetensors":
            args = ["info", p]
        else:
            args = ["fit", p, "--steps", "2", "--depth", "2", "--quiet", "-o", str(Path(p).parent / "o.safetensors")]
            args += ["--key", "w"] if p.endswith((".safetensors", ".pt")) or "keyed" in p else []
        r = CliRunner().invoke(app, args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, r.output)
