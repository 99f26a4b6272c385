"""The registry of backends (fastmlstm/ops/registry.py): auto, the environment override, clear errors
for missing backends, one log line on fallback, a package that imports and works without Triton; and
the door: every backend has the declared interface, and nothing outside fastmlstm/ops reaches into a
backend."""

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlstm import FastMLSTM
from fastmlstm.ops import registry as backends
from fastmlstm.ops.registry import ENV_BACKEND, BackendUnavailableError, resolve_backend


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
    backends._package_status.cache_clear()
    monkeypatch.setattr(backends, "_package_status", lambda name: (name == "reference", "ModuleNotFoundError: No module named 'triton'"))
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        resolve_backend("triton", torch.device("cpu"))
    assert backends.available_backends("cpu") == ["reference"]


def test_auto_on_cuda_without_kernels_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_package_status", lambda name: (name == "reference", "not installed"))
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


def test_float64_runs_on_the_reference_backend():
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"
    assert resolve_backend("reference", torch.device("cpu"), torch.float64) == "reference"
    for name in ("cpu", "triton"):
        if backends.backend_status(name, "cpu")[0]:
            with pytest.raises(BackendUnavailableError, match="backend='reference' takes torch.float64"):
                resolve_backend(name, torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("name", list(backends.REGISTRY))
def test_every_backend_package_has_the_declared_interface(name):
    from fastmlstm.ops import interface

    if not backends.backend_status(name, "cuda" if name in ("triton", "cuda") and not backends._interpret_mode()
                                   else "cpu")[0] and name != "cuda":
        pytest.skip(f"{name} is not usable here")
    if name == "cuda" and not backends._package_status("cuda")[0]:
        pytest.skip("the CUDA extension is not usable here")
    module = backends.module(name)
    missing = [entry for entry in interface.SEQUENCE_ENTRIES if not callable(getattr(module, entry, None))]
    assert not missing, f"backend {name!r} lacks {missing}"
    layer = [callable(getattr(module, entry, None)) for entry in interface.LAYER_ENTRIES]
    assert all(layer) or not any(layer), f"backend {name!r} has half of the layer entries"
    assert module.is_available()[0] in (True, False)


PACKAGE = Path(__file__).resolve().parents[2] / "fastmlstm"
BACKEND_PACKAGES = {f"fastmlstm.ops.{name}" for name in backends.REGISTRY}


def _imports(path: Path):
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        package = module.removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_nothing_outside_ops_imports_a_backend():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "ops") in path.parents:
            continue
        for name in _imports(path):
            if any(name == b or name.startswith(b + ".") for b in BACKEND_PACKAGES):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_backends_are_not_found_by_import_strings():
    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        source = path.read_text()
        assert "import_module" not in source and "__import__(" not in source, path


def test_self_check_reports_a_nan_as_an_infinite_difference(monkeypatch):
    """A backend whose output holds a NaN fails the self-check (``max(0.0, nan)`` is 0.0: it passed)."""
    import math

    from fastmlstm import diagnostics

    class Poisoned(FastMLSTM):
        def __init__(self, *args, backend, **kwargs):
            super().__init__(*args, backend="reference", **kwargs)
            self.poisoned = backend != "reference"

        def forward(self, *args, **kwargs):
            out, state = super().forward(*args, **kwargs)
            if self.poisoned:
                out = out.clone()
                out[-1, 0, 0] = float("nan")
            return out, state

    monkeypatch.setattr(diagnostics, "FastMLSTM", Poisoned)
    assert diagnostics.self_check("cpu", "cpu") == math.inf
    monkeypatch.setattr(diagnostics, "FastMLSTM", FastMLSTM)
    assert diagnostics.self_check("cpu", "reference") == 0.0
