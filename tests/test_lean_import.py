import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, sparsefit, torch\n"
        "bad = [m for m in ('typer', 'rich', 'numba', 'triton', 'matplotlib', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "sparsefit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "synth" in out.stdout


def _spin_after_import(first: str, env: dict[str, str]) -> str:
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = f"import {first}, sparsefit, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_openmp_spin_is_limited_only_when_it_can_take_effect_and_the_user_set_nothing():
    from sparsefit._openmp import SPIN_COUNT

    assert _spin_after_import("sys", {}) == str(SPIN_COUNT)
    assert _spin_after_import("sys", {"GOMP_SPINCOUNT": "5"}) == "5"
    assert _spin_after_import("sys", {"OMP_WAIT_POLICY": "active"}) == "None"
    # torch imported first has already loaded GNU OpenMP: setting it then would change nothing
    assert _spin_after_import("torch", {}) == "None"
