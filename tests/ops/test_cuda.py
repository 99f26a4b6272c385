"""The CUDA extension built from csrc/ (the ``cuda`` backend).

Without a GPU (CI): every translation unit of csrc/ compiles with nvcc against this PyTorch's
headers (compile only), so a broken extension cannot land; the driver (csrc/mlstm.cpp) and the
kernels' pointwise math (csrc/mlstm_pointwise.h) also run on CPU tensors, linked with host loops
in place of the CUDA launches (tests/csrc_host/), and must match the float64 truth as closely as
the reference does; a real failed build reports the compiler's error and the fix and leaves
``backend="auto"`` to fall back; the sources ship in the wheel. With a GPU as well: the extension
builds and loads, checks its inputs, runs inside a CUDA graph (so it uses the current stream and
never synchronizes with the host), and matches the float64 truth as closely as the reference does
(and as the Triton backend does) on outputs, states and every gradient, in float32, float16 and
bfloat16, at awkward shapes and at H = 4096. The parity
tests of tests/ops/test_recurrence.py, tests/nn/test_modules.py and tests/nn/test_compile.py run the ``cuda`` backend too,
since conftest's BACKENDS lists it once it builds.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import contract
from conftest import DTYPES
from tolerances import ABS, FACTOR, rel_err
from torch.utils import cpp_extension

import fastmlstm
from fastmlstm.ops import autograd, registry as backends
from fastmlstm.ops.cuda import build

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
ON_GPU = torch.cuda.is_available()


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


# ---------------------------------------------------------------------------------------------
# Compile check: no GPU needed, only nvcc and this PyTorch's headers.


def _cxx_standard() -> str:
    """The C++ standard torch.utils.cpp_extension compiles extensions with (c++20 for torch 2.13)."""
    try:
        found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension._write_ninja_file_to_build_library))
    except (AttributeError, OSError, TypeError):
        found = []
    return f"-std=c++{max(found, key=int) if found else '17'}"


def _gencode_flags() -> list[str]:
    """The oldest and the newest architecture this nvcc supports: both of c10's bfloat16 conversion
    paths (software below sm_80, native from sm_80) get compiled. The real build targets the GPU."""
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    archs = sorted(int(a[len("compute_"):]) for a in listed if re.fullmatch(r"compute_\d+", a))
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted({archs[0], archs[-1]})]


def _header_shim(directory: Path) -> list[str]:
    """CPU wheels of PyTorch ship the c10/cuda headers but not the one CMake generates for them,
    c10/cuda/impl/cuda_cmake_macros.h. Supply the content a shared-library build generates."""
    if any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in cpp_extension.include_paths()):
        return []
    header = directory / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(directory)]


def _compile_command(source: Path, obj: Path, shim: list[str]) -> list[str]:
    """nvcc -c with the flags the real build (torch.utils.cpp_extension.load) uses."""
    command = [
        NVCC, "-c", str(source), "-o", str(obj), _cxx_standard(),
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DTORCH_EXTENSION_NAME={build.LIBRARY}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-Xcompiler", "-fPIC", f"-I{source.parent}",
    ]
    for include in [*cpp_extension.include_paths(), sysconfig.get_path("include"), *shim]:
        command += ["-isystem", include]
    if source.suffix == ".cu":
        command += [*cpp_extension.COMMON_NVCC_FLAGS, *build.EXTRA_CUDA_CFLAGS, *_gencode_flags()]
    else:
        command += build.EXTRA_CFLAGS
    return command


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cpp/.cu of csrc/ at once (one nvcc per file, in parallel): {name: (rc, log)}."""
    out = tmp_path_factory.mktemp("csrc_objects")
    shim = _header_shim(out / "shim")

    def run(source: Path):
        command = _compile_command(source, out / f"{source.name}.o", shim)
        done = subprocess.run(command, capture_output=True, text=True)
        return source.name, (done.returncode, " ".join(command) + "\n" + done.stdout + done.stderr)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(build.sources(CSRC))) as pool:
        return dict(pool.map(run, build.sources(CSRC)))


def test_csrc_holds_the_extension_sources():
    names = {p.name for p in CSRC.iterdir()}
    assert {"mlstm.cpp", "mlstm_kernels.cu", "mlstm.h"} <= names
    assert [p.name for p in build.sources(CSRC)] == sorted(n for n in names if n.endswith((".cpp", ".cu")))
    assert build.source_dir() == CSRC  # an editable install/checkout reads csrc/ in place


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in build.sources(CSRC)])
def test_csrc_compiles_with_nvcc(compiled, source):
    returncode, log = compiled[source]
    assert returncode == 0, f"{source} does not compile:\n{log[-6000:]}"


@needs_nvcc
def test_compile_check_reports_a_broken_source(tmp_path):
    """The harness above fails loudly on a compiler error (it is not just running the preprocessor
    on the wrong files)."""
    broken = tmp_path / "broken.cu"
    broken.write_text('#error "fastmlstm compile-check canary"\n' + (CSRC / "mlstm_kernels.cu").read_text())
    shutil.copy(CSRC / "mlstm.h", tmp_path / "mlstm.h")
    done = subprocess.run(_compile_command(broken, tmp_path / "broken.o", _header_shim(tmp_path / "shim")),
                          capture_output=True, text=True)
    assert done.returncode != 0 and "compile-check canary" in done.stderr


# ---------------------------------------------------------------------------------------------
# The loader: build directory, failure reporting, packaging.


@pytest.fixture
def fresh_loader():
    build._outcome.cache_clear()
    backends._package_status.cache_clear()
    yield
    build._outcome.cache_clear()
    backends._package_status.cache_clear()


def test_build_directory_is_keyed_by_python_torch_cuda_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    directory = build.build_directory()
    assert directory.parent == tmp_path / build.LIBRARY
    name = directory.name
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in name and torch.__version__ in name
    assert "arch-8.0_9.0+PTX" in name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.build_directory() != directory  # another architecture never reuses the library


@pytest.mark.skipif(ON_GPU, reason="checks the report on a machine without a GPU")
def test_without_a_gpu_the_backend_says_why(fresh_loader):
    ok, why = fastmlstm.ops.cuda.is_available()
    assert not ok and ("CPU-only build" in why or "no CUDA device" in why), why
    ok, why = backends.backend_status("cuda", "cuda")
    assert not ok and "the 'cuda' backend is not usable" in why and "nvcc" in why, why


@pytest.mark.skipif(not cpp_extension.is_ninja_available(), reason="ninja is not installed")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) on PATH")
def test_failed_build_reports_the_compiler_error_and_the_fix(monkeypatch, tmp_path, caplog, fresh_loader):
    """A real torch.utils.cpp_extension.load of a source that does not compile (a C++ file alone:
    the host compiler fails in a second, where a .cu beside it would take a minute)."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    shutil.copy(CSRC / "mlstm.h", sources)
    (sources / "mlstm.cpp").write_text('#error "fastmlstm deliberately broken source"\n')
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setattr(build, "build_directory", lambda: tmp_path / "build")
    monkeypatch.setattr(build, "_preflight", lambda: None)  # pretend this is a CUDA machine
    monkeypatch.setattr(build, "aot_library", lambda *args: None)
    if cpp_extension.CUDA_HOME is None:  # a CPU build of torch: _jit_build asks for a toolkit first
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/nonexistent/cuda")
    with caplog.at_level("WARNING", logger="fastmlstm"):
        ok, why = backends.backend_status("cuda", "cuda")
    assert not ok
    assert "deliberately broken source" in why and "Fix:" in why and str(tmp_path / "build") in why, why
    messages = [r.getMessage() for r in caplog.records]
    assert sum("compiling the CUDA extension" in m for m in messages) == 1
    assert any("Full compiler output" in m for m in messages)
    with pytest.raises(build.ExtensionUnavailable, match="deliberately broken source"):
        build.load_library()  # the failure is remembered, not rebuilt on every call


def test_wheel_ships_the_sources(tmp_path):
    """setup.py copies csrc/ into the wheel, where the loader finds it."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, project)
    shutil.copytree(CSRC, project / "csrc")
    shutil.copytree(REPO / "fastmlstm", project / "fastmlstm", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(project)],
        capture_output=True, text=True, env={**os.environ, build.AOT_ENV: ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheel, = (tmp_path / "dist").glob("fastmlstm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "unpacked")
        names = set(archive.namelist())
    for source in CSRC.iterdir():
        if source.is_file():  # csrc/cpu/ holds the CPU extension, shipped beside its own package
            assert f"fastmlstm/ops/cuda/csrc/{source.name}" in names
    for source in (CSRC / "cpu").iterdir():
        assert f"fastmlstm/ops/cpu/csrc/{source.name}" in names
    found = subprocess.run(
        [sys.executable, "-c",
         f"import sys; sys.path.insert(0, {str(tmp_path / 'unpacked')!r}); "
         "from fastmlstm.ops.cuda import build; print(build.source_dir())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(found) == tmp_path / "unpacked" / "fastmlstm" / "ops" / "cuda" / "csrc"
    found = subprocess.run(
        [sys.executable, "-c",
         f"import sys; sys.path.insert(0, {str(tmp_path / 'unpacked')!r}); "
         "from fastmlstm.ops.cpu import build; print(build.source_dir())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(found) == tmp_path / "unpacked" / "fastmlstm" / "ops" / "cpu" / "csrc"


# ---------------------------------------------------------------------------------------------
# The host build: the real driver and pointwise math on CPU tensors, no GPU needed.

HOST_KERNELS = Path(__file__).resolve().parents[1] / "csrc_host" / "mlstm_host_kernels.cpp"
HOST_SHAPES = [(1, 1, 5), (6, 5, 19), (5, 9, 33), (0, 3, 8), (3, 37, 257)]


@pytest.fixture(scope="module")
def host_ops(tmp_path_factory):
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) on PATH")
    cpp_extension.load(
        name="fastmlstm_host",
        sources=[str(CSRC / "mlstm.cpp"), str(HOST_KERNELS)],
        # Its own operator namespace, so that it can share a process with the real extension.
        extra_cflags=[*build.EXTRA_CFLAGS, "-DFASTMLSTM_OPS_NAMESPACE=fastmlstm_host"],
        extra_include_paths=[str(CSRC)],
        build_directory=str(tmp_path_factory.mktemp("host_build")),
        is_python_module=False,
    )
    return torch.ops.fastmlstm_host


@pytest.fixture
def host_backend(host_ops, monkeypatch):
    """The ``cuda`` backend module (its Python layer included) running on the host build."""
    from fastmlstm.ops.cuda import recurrence

    monkeypatch.setattr(recurrence, "_ops", lambda: host_ops)
    return fastmlstm.ops.cuda


GRADIENT_SUBSETS = {"all": (0, 1, 2), "output": (0,), "c_n": (1,), "cells": (2,), "none": ()}


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", HOST_SHAPES, ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_build_matches_the_float64_truth_like_reference(host_backend, dtype, shape, ragged):
    proj, w_hh, w_hm, h0, c0, lengths, grads = _inputs(*shape, dtype, ragged=ragged, device="cpu")
    failures = []
    for subset, keep in GRADIENT_SUBSETS.items():
        some = tuple(g if k in keep else None for k, g in enumerate(grads))
        inputs = (proj, w_hh, w_hm, h0, c0, lengths, some)
        truth = _truth_f64(*inputs)
        ref, got = _run_backend("reference", *inputs), _run_backend("cuda", *inputs)
        for key, expected in truth.items():
            err_ref, err = rel_err(ref[key], expected), rel_err(got[key], expected)
            if err > FACTOR * err_ref + ABS[dtype]:
                failures.append(f"gradients {subset}, {key}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_build_save_modes_and_chunks_agree_bit_for_bit(host_backend, dtype):
    """Inference (nothing saved), cell states only and training compute the same values; carrying
    (h_n, c_n) from one call into the next reproduces one long call exactly."""
    T, B, H = 7, 3, 12
    proj, w_hh, w_hm, h0, c0, lengths, _ = _inputs(T, B, H, dtype, ragged=True, device="cpu")
    runs = {(s, r): host_backend.forward(proj, w_hh, w_hm, h0, c0, lengths, s, r)
            for s in (False, True) for r in (False, True)}
    output, c_n, cells, act = runs[True, True]
    assert act.shape == (T, B, 6 * H) and cells.shape == (T, B, H)
    for (save, cells_too), (o, c, cs, a) in runs.items():
        assert torch.equal(o, output) and torch.equal(c, c_n)
        assert torch.equal(cs, cells) if save or cells_too else cs.numel() == 0
        assert a.numel() == (T * B * 6 * H if save else 0)
    pieces, h, c = [], h0, c0
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        piece, c, _, _ = host_backend.forward(proj[start:stop], w_hh, w_hm, h, c, None, False, False)
        pieces.append(piece)
        h = piece[-1].float()
    whole, c_whole, _, _ = host_backend.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert torch.equal(torch.cat(pieces), whole) and torch.equal(c, c_whole)


def test_host_build_checks_its_inputs(host_ops):
    _check_input_messages(host_ops, "cpu")


def test_host_build_passes_opcheck(host_backend):
    """The custom op on the cuda backend: schema (no aliasing, no mutation), fake impl, autograd."""
    T, B, H = 3, 2, 5
    args = (
        torch.randn(T, B, 5 * H, requires_grad=True),
        torch.randn(4 * H, H, requires_grad=True) / H,
        torch.randn(H, H, requires_grad=True) / H,
        torch.randn(B, H, requires_grad=True),
        torch.randn(B, H, requires_grad=True),
        torch.tensor([3, 1]),
        "cuda", True, True,
    )
    torch.library.opcheck(autograd.sequence_forward, args)


# ---------------------------------------------------------------------------------------------
# On a GPU: build, checks, stream discipline, parity.


@pytest.fixture(scope="module")
def extension():
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        pytest.skip("needs a CUDA build of PyTorch and nvcc (CUDA_HOME) to build the extension")
    ok, why = build.status()
    assert ok, f"the CUDA extension did not build or load: {why}"
    return torch.ops.fastmlstm_cuda


def _inputs(T, B, H, dtype, ragged=False, seed=0, device="cuda"):
    return contract.inputs(T, B, H, dtype, ragged=ragged, seed=seed, device=device)


_truth_f64 = contract.truth


def _run_backend(name, proj, w_hh, w_hm, h0, c0, lengths, grads):
    backend = backends.module(name)
    output, c_n, cell_states, act = backend.forward(proj, w_hh, w_hm, h0, c0, lengths, True, True)
    grad_proj, gw_hh, gw_hm, g_h0, g_c0 = backend.backward(*grads, w_hh, w_hm, h0, c0, lengths, output,
                                                           cell_states, act)
    return dict(output=output, c_n=c_n, cell_states=cell_states, grad_proj=grad_proj, grad_weight_hh=gw_hh,
                grad_weight_hm=gw_hm, grad_h0=g_h0, grad_c0=g_c0)


# (T, B, H): one step of one row; odd H with B not a multiple of 8; H over several blocks; an empty
# sequence; a prime H near 1024; the paper's H = 4096 at batch 128.
GPU_SHAPES = [(1, 1, 5), (6, 5, 19), (5, 9, 33), (0, 3, 8), (9, 37, 1031), (8, 128, 4096)]


@needs_gpu
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_the_float64_truth_like_reference_and_triton(extension, dtype, shape, ragged):
    inputs = _inputs(*shape, dtype, ragged=ragged)
    truth = _truth_f64(*inputs)
    names = ["reference", "cuda"] + (["triton"] if backends.backend_status("triton", "cuda")[0] else [])
    results = {name: _run_backend(name, *inputs) for name in names}
    failures = []
    for key, expected in truth.items():
        err_ref = rel_err(results["reference"][key], expected)
        for name in names[1:]:
            err = rel_err(results[name][key], expected)
            if err > FACTOR * err_ref + ABS[dtype]:
                failures.append(f"{name} {key}: error {err:.2e} > {FACTOR} x reference {err_ref:.2e} "
                                f"+ {ABS[dtype]:.0e}")
    assert not failures, "\n".join(failures)


@needs_gpu
def test_outputs_have_the_contract_shapes_and_dtypes(extension):
    T, B, H = 3, 4, 6
    proj, w_hh, w_hm, h0, c0, lengths, grads = _inputs(T, B, H, torch.bfloat16)
    output, c_n, cells, act = fastmlstm.ops.cuda.forward(proj, w_hh, w_hm, h0, c0, None, False, False)
    assert output.shape == (T, B, H) and output.dtype == torch.bfloat16
    assert c_n.shape == (B, H) and c_n.dtype == torch.float32
    assert cells.numel() == 0 and act.numel() == 0
    output, c_n, cells, act = fastmlstm.ops.cuda.forward(proj, w_hh, w_hm, h0, c0, None, True, False)
    assert cells.shape == (T, B, H) and cells.dtype == torch.float32
    assert act.shape == (T, B, 6 * H) and act.dtype == torch.bfloat16
    assert c_n.data_ptr() != c0.data_ptr() and torch.equal(c_n, cells[-1])
    grad_proj, gw_hh, gw_hm, g_h0, g_c0 = fastmlstm.ops.cuda.backward(None, None, None, w_hh, w_hm, h0, c0, None,
                                                                      output, cells, act)
    assert grad_proj.shape == (T, B, 5 * H) and gw_hh.shape == (4 * H, H) and gw_hm.shape == (H, H)
    assert torch.count_nonzero(grad_proj) == 0 and torch.count_nonzero(g_c0) == 0  # nothing reached it


def _check_input_messages(ops, device):
    """Every malformed input of the operators is refused with a message that names it."""
    T, B, H = 2, 3, 4
    proj, w_hh, w_hm, h0, c0, _, _ = _inputs(T, B, H, torch.float32, device=device)
    ok = dict(proj=proj, weight_hh=w_hh, weight_hm=w_hm, h0=h0, c0=c0, lengths=None)

    def call(**changes):
        args = {**ok, **changes}
        return ops.forward(args["proj"], args["weight_hh"], args["weight_hm"], args["h0"], args["c0"],
                           args["lengths"], True, False)

    cases = [
        (dict(proj=proj.double()), r"proj must be float32, float16 or bfloat16"),
        (dict(proj=proj[..., :-1]), r"5 \* hidden_size"),
        (dict(proj=proj.transpose(0, 1).contiguous().transpose(0, 1)), r"proj must be contiguous"),
        (dict(weight_hh=w_hh.half()), r"weight_hh must have dtype Float"),
        (dict(weight_hh=w_hh[:-1]), r"weight_hh must have shape \[16, 4\], got \[15, 4\]"),
        (dict(weight_hm=w_hm.t()), r"weight_hm must be contiguous"),
        (dict(h0=h0.half()), r"h0 must have dtype Float"),
        (dict(c0=c0[:1]), r"c0 must have shape"),
        (dict(lengths=torch.tensor([1, 2, 2], dtype=torch.int32, device=device)), r"lengths must have dtype Long"),
        (dict(lengths=torch.tensor([1, 2], device=device)), r"lengths must have shape \[3\]"),
    ]
    if torch.device(device).type == "cuda":
        cases += [
            (dict(proj=proj.cpu()), r"proj must be a cuda tensor, got one on cpu"),
            (dict(weight_hm=w_hm.cpu()), r"weight_hm is on cpu"),
            (dict(lengths=torch.tensor([1, 2, 2])), r"lengths is on cpu"),
        ]
    for changes, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**changes)
    output, _, cells, act = call()
    with pytest.raises(RuntimeError, match=r"saved by forward\(save_for_backward=True\)"):
        ops.backward(None, None, None, w_hh, w_hm, h0, c0, None, output, cells, act.new_empty(0))
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        ops.backward(output[:1], None, None, w_hh, w_hm, h0, c0, None, output, cells, act)


@needs_gpu
def test_inputs_are_checked_with_clear_messages(extension):
    _check_input_messages(extension, "cuda")


@needs_gpu
def test_runs_inside_a_cuda_graph(extension):
    """Capture fails on any host synchronization or work outside the current stream."""
    T, B, H = 4, 5, 24
    proj, w_hh, w_hm, h0, c0, lengths, grads = _inputs(T, B, H, torch.bfloat16, ragged=True)

    def step():
        fwd = fastmlstm.ops.cuda.forward(proj, w_hh, w_hm, h0, c0, lengths, True, True)
        bwd = fastmlstm.ops.cuda.backward(*grads, w_hh, w_hm, h0, c0, lengths, fwd[0], fwd[2], fwd[3])
        return (*fwd, *bwd)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream (cuBLAS workspaces, handles)
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_device_other_than_the_current_one(extension):
    inputs = _inputs(3, 4, 8, torch.float32, ragged=True, device="cuda:1")
    with torch.cuda.device(0):
        on_1 = _run_backend("cuda", *inputs)
    reference = _run_backend("reference", *inputs)
    for key, value in on_1.items():
        assert value.device == torch.device("cuda:1")
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5)


@needs_gpu
def test_float16_with_float16_accumulation_switched_on(extension, monkeypatch):
    """torch refuses fp16 x fp16 -> fp32 GEMMs under allow_fp16_accumulation; the extension then
    multiplies float32 copies and stays as accurate as the reference."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "allow_fp16_accumulation"):
        pytest.skip("this torch has no allow_fp16_accumulation switch")
    monkeypatch.setattr(matmul, "allow_fp16_accumulation", True)
    inputs = _inputs(5, 6, 40, torch.float16, ragged=True)
    truth = _truth_f64(*inputs)
    got = _run_backend("cuda", *inputs)
    ref = _run_backend("reference", *inputs)
    for key in truth:
        err_ref = rel_err(ref[key], truth[key])
        assert rel_err(got[key], truth[key]) <= FACTOR * err_ref + ABS[torch.float16], key


@needs_gpu
def test_auto_prefers_triton_then_cuda(extension, monkeypatch):
    backends._log_once.cache_clear()
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    assert "cuda" in fastmlstm.available_backends("cuda")
    real = backends.backend_status
    monkeypatch.setattr(backends, "backend_status",
                        lambda b, d=None: (False, "disabled by the test") if b == "triton" else real(b, d))
    assert backends.resolve_backend("auto", torch.device("cuda")) == "cuda"
    backends._log_once.cache_clear()

