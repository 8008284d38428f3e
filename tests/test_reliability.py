"""The CLI's promises about files: outputs never destroy what was there, readers never over-allocate."""

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sparsefit import synth
from sparsefit.cli import app

runner = CliRunner()
FAST = ["--steps", "20", "--batch", "8", "--depth", "2", "--quiet"]
root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="device nodes can only be made (and /dev/null replaced) by root"
)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def g(tmp_path):
    p = tmp_path / "g.npy"
    assert run("synth", "perm", "--size", 8, "-o", p).exit_code == 0
    return p


def _one_error_line(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


@root_only
def test_fit_onto_dev_null_leaves_it_a_character_device(g):
    before = os.stat("/dev/null")
    r = run("fit", g, *FAST, "-o", "/dev/null")
    assert r.exit_code == 0, r.output
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


@root_only
@pytest.mark.parametrize("command", ["fit", "synth", "apply"])
def test_every_writer_streams_into_a_character_device(tmp_path, g, command):
    node = tmp_path / "node"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    if command == "fit":
        r = run("fit", g, *FAST, "-o", node, "--json", node)
    elif command == "synth":
        r = run("synth", "perm", "--size", 8, "-o", node)
    else:
        op = tmp_path / "g.safetensors"
        assert run("fit", g, *FAST, "-o", op).exit_code == 0
        r = run("apply", op, g, "-o", node)
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(node.stat().st_mode) and node.stat().st_rdev == os.makedev(1, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@root_only
def test_a_full_device_is_one_line_and_exit_2(tmp_path, g):
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # a private /dev/full
    line = _one_error_line(run("fit", g, *FAST, "-o", full))
    assert "No space left on device" in line
    assert stat.S_ISCHR(full.stat().st_mode)


def test_new_output_files_get_mode_644_under_umask_022(tmp_path, g):
    old = os.umask(0o022)
    try:
        assert run("synth", "lowrank", "--size", 8, "-o", tmp_path / "a.npy").exit_code == 0
        r = run("fit", g, *FAST, "-o", tmp_path / "g.safetensors", "--json", tmp_path / "r.json")
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    for name in ("a.npy", "g.safetensors", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_replacing_an_output_keeps_its_mode(tmp_path, g):
    out = tmp_path / "g.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    assert run("fit", g, *FAST, "-o", out).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.stat().st_size > 3


def _npy_claiming(shape, descr="<f8"):
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize("shape", [(100000000, 100000000), (10**16,), (10**8, 10**8, 0, -1)])
def test_npy_claiming_a_huge_shape_is_one_line_and_exit_2(tmp_path, shape):
    p = tmp_path / "huge.npy"
    p.write_bytes(_npy_claiming(shape).ljust(128, b"\0"))
    assert p.stat().st_size == 128
    line = _one_error_line(run("fit", p, *FAST))
    assert "corrupt" in line


def test_npz_member_claiming_a_huge_shape(tmp_path):
    import zipfile

    p = tmp_path / "huge.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.npy", _npy_claiming((10**16,)) + b"\0" * 64)
    assert "truncated or corrupt" in _one_error_line(run("fit", p, *FAST))


def test_a_fortran_order_npy_reads_the_same(tmp_path):
    from sparsefit.targets import read_npy

    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.save(tmp_path / "f.npy", a)
    got = read_npy(tmp_path / "f.npy")
    assert np.array_equal(got, a) and got.flags.writeable


def test_dev_stdout_is_written_into_whether_a_pipe_or_a_file(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "sparsefit", "synth", "perm", "--size", "8", "-o", "/dev/stdout"]
    piped = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    expect = synth("perm", 8, 3, 0)
    assert np.array_equal(np.load(io.BytesIO(piped.stdout)), expect)
    target = tmp_path / "redirected.npy"
    target.write_bytes(b"")
    inode = target.stat().st_ino
    with open(target, "wb") as f:
        assert subprocess.run(cmd, stdout=f, env=env, timeout=120).returncode == 0
    assert target.stat().st_ino == inode and np.array_equal(np.load(target), expect)
    assert [p.name for p in tmp_path.iterdir()] == ["redirected.npy"]


def test_plots_go_through_the_same_output_rules(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsefit.compress.evaluate import save_plot

    result = {
        "task": "encoder",
        "curve": [{"method": "svd", "kept_fraction": 0.5, "cosine_mean": 0.9}],
        "methods": {"gtilde": {"kept_fraction": 0.5, "cosine_mean": 0.95}},
    }
    old = os.umask(0o022)
    try:
        save_plot(result, str(tmp_path / "q.png"))
    finally:
        os.umask(old)
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert stat.S_IMODE((tmp_path / "q.png").stat().st_mode) == 0o644
    if os.geteuid() == 0:
        node = tmp_path / "node"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        save_plot(result, str(node))
        assert stat.S_ISCHR(node.stat().st_mode)
