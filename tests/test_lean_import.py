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
