"""``sparsefit compress`` under failure: SIGKILL then resume, a full disk, a failing or dead rank.

Each test runs the real CLI in child processes on a tiny synthetic checkpoint (seconds each).
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsefit.cli import app

from .test_compress import FAST, FAST_CFG, files_under, tiny_state, write_sharded

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# Runs ``sparsefit compress ARGS`` and SIGKILLs itself at the Nth output file that sparsefit
# writes: "written" = after that file was renamed into place, "unrenamed" = after its
# temporary file was written in full but before the rename.
KILLER = """
import contextlib, os, signal, sys
import sparsefit.fileformat as ff
n, when, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
orig, count = ff.atomic_output, [0]

@contextlib.contextmanager
def killing(path):
    count[0] += 1
    with orig(path) as f:
        yield f
        if count[0] == n and when == "unrenamed":
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

ff.atomic_output = killing
from sparsefit.cli import main
main(args)
"""


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    _, state = tiny_state()
    return write_sharded(tmp_path / "model", state)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in sorted(files_under(d)) if (d / name).is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``(model, out, files)``: one uninterrupted run's output, by path and bytes (``out`` is left free)."""
    base = tmp_path_factory.mktemp("crash")
    _, state = tiny_state()
    model, out = write_sharded(base / "model", state), base / "out"
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children, which run with OMP_NUM_THREADS=1
    try:
        assert _run("compress", model, "-o", out, *FAST).exit_code == 0
    finally:
        torch.set_num_threads(old)
    files = _snapshot(out)
    shutil.rmtree(out)
    return model, out, files


# 4 layer files, 2 dense shards, config.json, tokenizer.json, manifest.json: 9 outputs in all
@pytest.mark.parametrize(("n", "when"), [(1, "unrenamed"), (3, "written"), (6, "unrenamed"), (9, "unrenamed")])
def test_sigkill_at_any_output_then_resume_gives_the_same_bytes(uninterrupted, n, when):
    model, out, reference = uninterrupted
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", KILLER, str(n), when, "compress", str(model), "-o", str(out), *FAST]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    if when == "unrenamed":  # the killed write left its temporary file
        assert any(name.endswith(".part") for name in files_under(out))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = _run("compress", model, "-o", out, *FAST)
    finally:
        torch.set_num_threads(old)
    assert r.exit_code == 0, r.output
    assert _snapshot(out) == reference


def test_full_disk_mid_run_keeps_the_previous_output_and_says_so(tmp_path, model, monkeypatch):
    import sparsefit.fileformat as ff

    out = tmp_path / "out"
    assert _run("compress", model, "-o", out, *FAST).exit_code == 0
    before = _snapshot(out)
    orig, count = ff.write_safetensors, [0]

    def fills_up(f, tensors, metadata=None):
        count[0] += 1
        if count[0] == 2:
            f.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(f, tensors, metadata)

    monkeypatch.setattr(ff, "write_safetensors", fills_up)
    other = [a if a != "4" else "3" for a in FAST]  # another depth: every layer is fitted again
    r = _run("compress", model, "-o", out, *other)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "No space left on device" in lines[0] and "left as it was" in lines[0]
    after = _snapshot(out)
    changed = [k for k in before if after.get(k) != before[k]]
    # one layer was rewritten for the new depth and the outdated manifest withdrawn; the rest is intact
    assert len(changed) == 2 and changed[0].startswith("layers/") and changed[1] == "manifest.json", changed
    assert "manifest.json" not in after
    assert set(after) == set(before) - {"manifest.json"}  # no temporary file left
    monkeypatch.setattr(ff, "write_safetensors", orig)
    assert _run("compress", model, "-o", out, *other).exit_code == 0


# ---- ranks ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(src: Path, out: Path, steps: int = 30) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
        env.update({"MASTER_PORT": str(port), "SPARSEFIT_RANK_TIMEOUT": "4"})
        options = [a if a != "30" else str(steps) for a in FAST]
        cmd = [sys.executable, "-m", "sparsefit", "compress", str(src), "-o", str(out), *options]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(proc: subprocess.Popen, seconds: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"a rank still waited after {seconds} s: {err[-2000:]}")
    return proc.returncode, err


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_stops_the_other_with_a_clear_line(tmp_path, failing):
    from sparsefit.compress import CompressConfig, plan_checkpoint

    _, state = tiny_state()
    src = write_sharded(tmp_path / "model", state)
    _, plans = plan_checkpoint(src, CompressConfig(**FAST_CFG))
    bad = next(p.name for p in plans if p.index % 2 == failing)
    state[bad][0, 0] = float("nan")
    src = write_sharded(tmp_path / "model", state)
    procs = _start_ranks(src, tmp_path / "out")
    other = 1 - failing
    rc_f, err_f = _finish(procs[failing], 90)
    rc_o, err_o = _finish(procs[other], 30)
    for rc, err in ((rc_f, err_f), (rc_o, err_o)):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "NaN" in lines[0], err
    assert f"stopping rank {other} because rank {failing} failed" in err_o


def test_a_killed_rank_stops_the_other_within_the_timeout(tmp_path, model):
    out = tmp_path / "out"
    procs = _start_ranks(model, out, steps=1500)  # rank 1 is still fitting its second layer when killed
    deadline = time.monotonic() + 90
    while not (out / "layers" / "00001.safetensors").exists():  # rank 1's first layer
        assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-2000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].communicate()
    t0 = time.monotonic()
    rc0, err0 = _finish(procs[0], 60)
    lines0 = [ln for ln in err0.splitlines() if ln.strip()]
    assert rc0 == 2 and len(lines0) == 1 and "rank 1" in lines0[0], err0
    assert time.monotonic() - t0 < 30
