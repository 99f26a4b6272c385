"""Backend choice: auto, the environment override, clear errors for missing backends, one log line
on fallback, and a package that imports and works without Triton."""

import logging
import subprocess
import sys

import pytest
import torch

from fastmlstm import FastMLSTM, backends
from fastmlstm.backends import ENV_BACKEND, BackendUnavailableError, resolve_backend


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    backends._log_once.cache_clear()
    yield
    backends._log_once.cache_clear()


def test_auto_uses_the_cpu_extension_on_cpu():
    expected = "cpu" if backends.backend_status("cpu", "cpu")[0] else "reference"
    assert resolve_backend("auto", torch.device("cpu")) == expected


def test_auto_on_cpu_without_the_extension_falls_back_with_one_log_line(monkeypatch, caplog):
    real = backends.backend_status
    monkeypatch.setattr(backends, "backend_status",
                        lambda b, d=None: (False, "no C++ compiler found") if b == "cpu" else real(b, d))
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        for _ in range(3):
            assert resolve_backend("auto", torch.device("cpu")) == "reference"
    records = [r for r in caplog.records if "falling back" in r.message]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "cpu: no C++ compiler found" in records[0].message


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "triton")
    assert resolve_backend("auto", torch.device("cpu")) == "triton"  # runs through the interpreter here
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv(ENV_BACKEND, "fastest")
    with pytest.raises(ValueError, match=ENV_BACKEND):
        resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cudnn", torch.device("cpu"))


def test_missing_cuda_extension_says_how_to_get_it():
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))


def test_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(backends, "_interpret_mode", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backends, "_import_status", lambda module: (False, "ModuleNotFoundError: No module named 'triton'"))
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        resolve_backend("triton", torch.device("cpu"))
    assert backends.available_backends("cpu") == ["reference"]


def test_auto_on_cuda_without_kernels_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_import_status", lambda module: (False, "not installed"))
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        for _ in range(3):
            assert resolve_backend("auto", torch.device("cuda")) == "reference"
    records = [r for r in caplog.records if "falling back" in r.message]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "triton" in records[0].message and "cuda" in records[0].message


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, fastmlstm\n"
        "assert 'triton' not in fastmlstm.available_backends('cpu'), fastmlstm.available_backends('cpu')\n"
        "out, (h, c) = fastmlstm.FastMLSTM(3, 5)(torch.randn(4, 2, 3))\n"
        "assert out.shape == (4, 2, 5)\n"
        "try:\n"
        "    fastmlstm.FastMLSTM(3, 5, backend='triton')(torch.randn(4, 2, 3))\n"
        "except fastmlstm.BackendUnavailableError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_backend_argument_is_used(monkeypatch):
    calls = []
    from fastmlstm.ops import reference

    real = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *a: calls.append(1) or real(*a))
    FastMLSTM(3, 4, backend="reference")(torch.randn(2, 1, 3))
    assert calls
