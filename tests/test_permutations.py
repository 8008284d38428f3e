import json
import math
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit import FitConfig, GTilde, SparsefitError, fit
from sparsefit.butterfly import butterfly_blocks, butterfly_init
from sparsefit.cli import app
from sparsefit.metrics import relative_error
from sparsefit.permutations import (
    SAMPLERS,
    check_permutations,
    inverse_permutations,
    riffle_permutation,
    sample_permutations,
)
from sparsefit.targets import as_target

HADAMARD_BLOCK = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)


def composite(perms: torch.Tensor) -> torch.Tensor:
    comp = torch.arange(perms.shape[1])
    for p in perms:
        comp = comp[p]
    return comp


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("depth,width", [(1, 2), (3, 8), (7, 6), (10, 64), (5, 30)], ids=str)
def test_samplers_give_permutations(sampler, depth, width):
    p = sample_permutations(depth, width, torch.Generator().manual_seed(0), sampler)
    assert p.dtype == torch.int64
    check_permutations(p, width, depth)


def test_riffle_is_bit_rotation():
    p = riffle_permutation(16)
    rotr = torch.tensor([(i >> 1) | ((i & 1) << 3) for i in range(16)])
    assert torch.equal(p, rotr)
    assert torch.equal(riffle_permutation(6), torch.tensor([0, 3, 1, 4, 2, 5]))


@pytest.mark.parametrize("depth,width", [(4, 16), (5, 16), (9, 16), (3, 6), (7, 10)], ids=str)
def test_butterfly_keeps_natural_output_order(depth, width):
    p = sample_permutations(depth, width, torch.Generator(), "butterfly")
    assert torch.equal(composite(p), torch.arange(width))
    # deterministic, and does not consume the generator
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    assert torch.equal(sample_permutations(depth, width, gen, "butterfly"), p)
    assert torch.equal(gen.get_state(), state)


def test_butterfly_odd_width_rejected():
    with pytest.raises(SparsefitError, match="even width"):
        riffle_permutation(7)


@pytest.mark.parametrize("levels", [1, 3, 6])
def test_hadamard_blocks_give_walsh_hadamard(levels):
    n = 2**levels
    g = GTilde(n, n, levels, n, sampler="butterfly", dtype=torch.float64)
    with torch.no_grad():
        g.blocks.copy_(HADAMARD_BLOCK.expand_as(g.blocks))
    h = scipy.linalg.hadamard(n) / math.sqrt(n)
    assert np.abs(g.to_dense().numpy() - h).max() < 1e-12


def test_butterfly_init_recovers_random_butterfly_product():
    g = GTilde(32, 32, 5, 32, sampler="butterfly", dtype=torch.float64)
    with torch.no_grad():
        g.blocks.copy_(torch.randn(g.blocks.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    a = g.to_dense()
    op = butterfly_init(as_target(a), 5, 32, dtype=torch.float64)
    assert relative_error(op, as_target(a)).value < 1e-12


@pytest.mark.parametrize(
    "size,depth,width", [(8, 3, 8), (64, 6, 64), (64, 7, 64), (64, 12, 64), (32, 6, 64), (32, 9, 64)], ids=str
)
def test_butterfly_init_hadamard_any_depth(size, depth, width):
    a = sparsefit.synth("hadamard", size=size)
    op = butterfly_init(as_target(a), depth, width, dtype=torch.float64)
    assert relative_error(op, as_target(a)).value < 1e-12


def test_butterfly_init_matrix_free_target():
    h = torch.from_numpy(sparsefit.synth("hadamard", size=16))
    op = butterfly_init(as_target(lambda x: h.to(x.dtype) @ x, shape=(16, 16)), 4, 16, dtype=torch.float64)
    assert float((op.to_dense() - h).abs().max()) < 1e-12


@pytest.mark.parametrize("size", [64, 256])
def test_fit_hadamard_exact_at_n_log_n_params(size):
    levels = size.bit_length() - 1
    a = sparsefit.synth("hadamard", size=size)
    t0 = time.perf_counter()
    r = fit(a, FitConfig(width=size, depth=levels, sampler="butterfly", init="butterfly", steps=0))
    assert time.perf_counter() - t0 < 30
    assert r.metrics.relative_error <= 1e-6 and r.metrics.relative_error_method == "exact"
    assert r.metrics.params == 2 * size * levels
    assert r.operator.sampler == "butterfly" and r.metrics.steps_run == 0


def test_fit_keeps_exact_init_when_training_is_worse():
    a = sparsefit.synth("hadamard", size=32)
    cfg = FitConfig(width=32, depth=5, sampler="butterfly", init="butterfly", steps=50, batch=16, backend="torch")
    r = fit(a, cfg)
    assert r.metrics.relative_error <= 1e-6 and r.metrics.steps_run == 50


def test_butterfly_init_errors():
    a = as_target(sparsefit.synth("hadamard", size=16))
    with pytest.raises(SparsefitError, match="power-of-two width"):
        butterfly_blocks(torch.eye(6, dtype=torch.float64), 3, 6)
    with pytest.raises(SparsefitError, match="depth >= log2"):
        butterfly_init(a, 3, 16)
    with pytest.raises(SparsefitError, match="butterfly permutations"):
        FitConfig(init="butterfly")
    with pytest.raises(SparsefitError, match="steps"):
        FitConfig(steps=0)
    with pytest.raises(SparsefitError, match="init"):
        FitConfig(init="magic")


def test_butterfly_file_records_sampler(tmp_path):
    a = sparsefit.synth("hadamard", size=16)
    r = fit(a, FitConfig(width=16, depth=4, sampler="butterfly", init="butterfly", steps=0))
    path = tmp_path / "h.safetensors"
    r.save(str(path))
    op, _, header = sparsefit.load(path)
    assert header["permutation_sampler"] == "butterfly"
    assert header["config"]["sampler"] == "butterfly" and header["config"]["init"] == "butterfly"
    assert torch.equal(op.perms, r.operator.perms)
    assert relative_error(op, as_target(a)).value <= 1e-6


def test_cli_butterfly_hadamard(tmp_path):
    runner = CliRunner()
    h = tmp_path / "H.npy"
    assert runner.invoke(app, ["synth", "hadamard", "--size", "64", "-o", str(h)]).exit_code == 0
    out = tmp_path / "H.safetensors"
    args = ["fit", str(h), "--permutations", "butterfly", "--init", "butterfly", "--width", "64", "--depth", "6"]
    r = runner.invoke(app, [*args, "--steps", "0", "-o", str(out), "--json", "-", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["relative_error"] <= 1e-6 and report["params"] == 2 * 64 * 6
    assert report["config"]["sampler"] == "butterfly"
    assert sparsefit.read_header(out)["permutation_sampler"] == "butterfly"
    # the alias, and a clear error for a width the closed form cannot use
    r = runner.invoke(app, ["fit", str(h), "--sampler", "butterfly", "--init", "butterfly", "--width", "96", "-q"])
    assert r.exit_code == 2 and "power-of-two width" in r.output


def test_inverse_permutations_roundtrip():
    p = sample_permutations(3, 10, torch.Generator().manual_seed(0), "uniform")
    inv = inverse_permutations(p)
    assert torch.equal(torch.gather(p, 1, inv), torch.arange(10).expand(3, 10))
