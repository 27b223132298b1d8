"""Package-level behaviour: lazy imports, build_info, the backend switch, the CLI."""

import os
import subprocess
import sys

import pytest
import torch

import effkern
from effkern.backend import select


def test_build_info_keys():
    info = effkern.build_info()
    for key in ("version", "torch", "cpu_kernels", "cuda_kernels", "cuda_arch_list", "triton", "backend"):
        assert key in info
    assert info["version"] == effkern.__version__


@pytest.mark.skipif(os.environ.get("EFFKERN_EXPECT_CUDA_KERNELS") != "1",
                    reason="set by ./dev test when nvcc is present")
def test_cuda_kernels_were_compiled():
    info = effkern.build_info()
    assert info["cpu_kernels"] and info["cuda_kernels"], info
    assert info["cuda_arch_list"]


def test_backend_switch():
    assert effkern.get_backend() in ("auto", "triton", "cuda", "cpu", "reference")
    with effkern.use_backend("reference"):
        assert effkern.get_backend() == "reference"
        assert select(torch.device("cpu"), {"cpu", "reference"}) == "reference"
    with effkern.use_backend("auto"):
        assert select(torch.device("cpu"), {"cpu", "reference"}) == "cpu"
        assert select(torch.device("cpu"), {"triton", "reference"}) == "reference"
        assert select(torch.device("cuda"), {"triton", "reference"}) == "triton"
        assert select(torch.device("cuda"), {"cuda", "triton", "reference"}) == "cuda"
        assert select(torch.device("cuda"), {"flash", "triton", "reference"}) == "flash"
        assert select(torch.device("cpu"), {"flash", "reference"}) == "reference"
    with effkern.use_backend("cuda"):  # not applicable to CPU tensors: auto
        assert select(torch.device("cpu"), {"cpu", "cuda", "reference"}) == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        effkern.set_backend("fastest")


def test_env_backend_is_read_at_import():
    code = "import effkern; print(effkern.get_backend())"
    env = dict(os.environ, EFFKERN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_import_without_extension_warns_and_falls_back():
    # Make `import effkern._C` fail as a broken build would: import still works,
    # the first use of the ops warns once with the reason, and they use the PyTorch reference.
    code = ("import sys, warnings, torch\nsys.modules['effkern._C'] = None\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    import effkern, effkern.ops\n"
            "print(sum('could not be loaded' in str(x.message) for x in w))\n"
            "print(effkern.build_info()['cpu_kernels'], effkern.build_info()['load_error'] is not None)\n"
            "x = torch.randn(1, 1, 8, 8, dtype=torch.float64)\n"
            "print(float((effkern.ops.fft_crop(x, 4) - torch.ops.effkern.fft_crop(x, [4, 4])).abs().max()))\n"
            "print(all(torch.Tag.pt2_compliant_tag in getattr(torch.ops.effkern, n).default.tags\n"
            "          for n in ('fft_crop', 'fft_crop_backward')))\n")  # the Python schema copy's tag
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:3] == ["1", "False", "True"] and float(lines[3]) < 1e-12 and lines[4] == "True", out.stdout


def test_cli_lists_benchmarks_and_rejects_unknown():
    out = subprocess.run([sys.executable, "-m", "effkern", "bench", "nope"], capture_output=True, text=True)
    assert out.returncode != 0 and "fft_crop" in out.stderr


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True)


def test_import_effkern_loads_neither_torch_nor_the_extension():
    out = _run_python("import sys, effkern\n"
                      "print(effkern.__version__, [m for m in ('torch', 'timm', 'effkern._C', 'effkern.ops')"
                      " if m in sys.modules])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [effkern.__version__, "[]"], out.stdout


def test_public_names_load_on_first_use():
    out = _run_python("import sys, effkern\n"
                      "print(callable(effkern.ops.fft_crop), 'effkern.ops' in sys.modules)\n"
                      "print(callable(effkern.timm.patch), effkern.get_backend())\n"
                      "print(hasattr(__import__('torch').ops.effkern, 'fft_crop'))\n"
                      "try:\n    effkern.nope\nexcept AttributeError as e:\n    print('AttributeError', e)")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["True True", "True auto", "True"], out.stdout
    assert lines[3].startswith("AttributeError") and "'nope'" in lines[3]


def test_effkern_timm_without_timm_names_the_extra():
    out = _run_python("import sys\nsys.modules['timm'] = None  # as if timm were not installed\n"
                      "import effkern\ntry:\n    effkern.timm\nexcept ImportError as e:\n    print(e)")
    assert out.returncode == 0, out.stderr
    assert "pip install 'effkern[timm]'" in out.stdout, out.stdout


def test_cli_help_imports_no_torch():
    out = _run_python("import sys\nfrom effkern.cli import main\nrc = main(['--help'])\n"
                      "print(rc, [m for m in ('torch', 'timm', 'effkern.cli_train') if m in sys.modules])")
    assert out.returncode == 0, out.stderr
    assert "usage: effkern" in out.stdout and out.stdout.splitlines()[-1] == "0 []", out.stdout


def test_cli_names_the_missing_extra(monkeypatch, capsys):
    import importlib.util

    from effkern import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["train", "--budget", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "effkern train: needs matplotlib, not installed: pip install 'effkern[train]'"
    assert cli.missing_packages("bench") is None
