"""Shared fixtures.

``torch.empty`` and friends are filled with NaN in every test (PyTorch's deterministic mode with
``fill_uninitialized_memory``), so code that reads memory it never wrote fails loudly.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.deterministic


@pytest.fixture(autouse=True)
def _nan_poisoned_empty():
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    den = torch.linalg.norm(b)
    return float(torch.linalg.norm(a - b) / (den if den > 0 else 1))
