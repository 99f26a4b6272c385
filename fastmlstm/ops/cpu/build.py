"""Finds, builds and loads the C++ CPU extension compiled from ``csrc/cpu/``.

The extension registers the operators ``torch.ops.fastmlstm_cpu.*`` (``TORCH_LIBRARY`` in
``csrc/cpu/mlstm_cpu.cpp``). It comes from one of two places, tried in order:

1. an ahead-of-time build, ``fastmlstm/ops/cpu/_C.<python tag>.so``, made at install time with
   ``FASTMLSTM_BUILD_CPU=1 pip install --no-build-isolation .`` (see ``setup.py``); skipped when the
   sources beside it are newer (an editable checkout that changed since);
2. a build on first use with :func:`torch.utils.cpp_extension.load` (ninja and a C++ compiler; about
   half a minute on two cores), cached in
   ``$TORCH_EXTENSIONS_DIR/fastmlstm_cpu/<python>-<torch>-<hash>-<place>/`` (default root
   ``~/.cache/torch_extensions``), where the hash covers the sources and the flags, and the place
   the sources' folder and torch's installation: two checkouts, two environments, or two versions
   of the sources, never share or overwrite a build.

The sources are ``fastmlstm/ops/cpu/csrc/`` in an installed wheel (``setup.py`` copies them there)
and ``csrc/cpu/`` in an editable install or a checkout.

A build that cannot happen (no compiler, no ninja) or fails raises :class:`ExtensionUnavailable` with
the reason and the fix; :func:`status` turns that into ``(False, reason)`` so that
``backend="auto"`` falls back to the reference loop, with one log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .._extension import (
    ExtensionUnavailable,
    aot_library,
    build_with_torch,
    compiler_errors,
    entry_points,
    load_prebuilt_or_build,
    place_key,
)

__all__ = [
    "AOT_ENV",
    "LIBRARY",
    "SOURCES",
    "ExtensionUnavailable",
    "build_directory",
    "load_library",
    "source_dir",
    "sources",
    "status",
]

logger = logging.getLogger("fastmlstm")

# The TORCH_LIBRARY namespace of csrc/cpu/mlstm_cpu.cpp, and the name of the first-use build.
LIBRARY = "fastmlstm_cpu"
AOT_MODULE = "_C"
AOT_ENV = "FASTMLSTM_BUILD_CPU"
# Translation units in link order. The driver's come first (mlstm_cpu.cpp, the operators, first of
# all: source_dir() looks for it): inline functions that the AVX2 and AVX-512 copies of the kernels
# also instantiate must resolve to the baseline code (see kernels_avx2.cpp).
SOURCES = ("mlstm_cpu.cpp", "buffer_cache.cpp", "pack.cpp", "forward.cpp", "backward.cpp", "gemm.cpp",
           "kernels_default.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")
HEADERS = ("driver.h", "mlstm_cpu.h", "mlstm_cpu_kernels.h", "mlstm_cpu_vec.h")
# On top of torch.utils.cpp_extension's own flags (C++ standard, -fPIC, -O2). No -march: the
# library must run on any CPU of the architecture; the AVX2 and AVX-512 kernels switch their target
# themselves.
# -fopenmp where torch's parallel backend is OpenMP: at::parallel_for is an inline template whose
# OpenMP pragma the extension itself must compile, or every loop runs on one thread whatever
# torch.get_num_threads() says (without it, featurize ran on one of two cores). Linking it names
# libgomp.so.1, which resolves to the copy torch has already loaded. Not on macOS, whose clang has
# no -fopenmp.
# Tuples: torch.utils.cpp_extension.load appends to the lists it is given, which would change
# source_hash() (and so the build directory) between two loads in one process.
OPENMP_FLAGS = ("-fopenmp",) if torch._C.has_openmp and sys.platform != "darwin" else ()
EXTRA_CFLAGS = ("-O3", *OPENMP_FLAGS)
EXTRA_LDFLAGS = OPENMP_FLAGS

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_dir() -> Path:
    """The directory holding the extension's sources: the wheel's copy, else the checkout's csrc/cpu/."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parents[2] / "csrc" / "cpu"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise ExtensionUnavailable(
        f"the CPU extension's sources are not installed (looked in {_PACKAGE_DIR / 'csrc'} and "
        f"{_PACKAGE_DIR.parents[2] / 'csrc' / 'cpu'}); reinstall fastmlstm from a wheel or a checkout that has csrc/cpu/"
    )


def sources(directory: Path | None = None) -> list[Path]:
    """The extension's translation units, in link order."""
    directory = source_dir() if directory is None else directory
    return [directory / name for name in SOURCES]


def source_hash(directory: Path | None = None) -> str:
    """A short hash of every source and header and of the compiler flags."""
    directory = source_dir() if directory is None else directory
    digest = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    digest.update(" ".join((*EXTRA_CFLAGS, "|", *EXTRA_LDFLAGS)).encode())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """Where the first-use build goes: one directory per Python, torch, source hash and place (the
    sources' folder and torch's installation, :func:`~fastmlstm.ops._extension.place_key`)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"{python}-torch{torch.__version__}-{source_hash()}-{place_key(source_dir())}"
    return Path(root) / LIBRARY / re.sub(r"[^0-9A-Za-z.+_-]+", "_", key)


def _newest_source_mtime(directory: Path) -> float:
    return max((directory / name).stat().st_mtime for name in SOURCES + HEADERS)


def _compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would run ($CXX, else c++), if it exists."""
    name = os.environ.get("CXX", "c++").strip() or "c++"
    return shutil.which(name.split()[0])


def _preflight() -> None:
    """Reasons the extension cannot be built here, found without compiling anything."""
    from torch.utils import cpp_extension

    if _compiler() is None:
        raise ExtensionUnavailable(
            f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH); install one "
            "(e.g. `apt install g++`) or set CXX"
        )
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed; install it with `pip install ninja`")


def _build_failure(error: BaseException, build_dir: Path) -> str:
    """The reason shown for a failed build: the compiler's own error lines, then the fix."""
    return (
        f"building the CPU extension failed:\n{compiler_errors(error)}\n"
        f"Fix: use a C++ compiler that builds PyTorch extensions (g++ >= 9 or clang >= 10; set CXX to choose "
        f"one) and ninja (pip install ninja); then delete {build_dir} and retry. Meanwhile backend='auto' uses "
        "the reference loop."
    )


def _jit_build() -> str:
    _preflight()
    src_dir = source_dir()
    build_dir = build_directory()
    def announce() -> str | None:
        return None if (build_dir / f"{LIBRARY}.so").is_file() else (
            f"fastmlstm: compiling the CPU extension from {src_dir} into {build_dir} (first use; about half a minute)")

    return build_with_torch(LIBRARY, sources(src_dir), build_dir, announce=announce, failure=_build_failure,
                            extra_cflags=list(EXTRA_CFLAGS), extra_ldflags=list(EXTRA_LDFLAGS),
                            extra_include_paths=[str(src_dir)])


def _load() -> str:
    return load_prebuilt_or_build(
        "CPU", aot_library(_PACKAGE_DIR, AOT_MODULE),
        lambda lib: lib.stat().st_mtime >= _newest_source_mtime(source_dir()), _jit_build)


# load_library() loads the extension, building it on first use, or raises ExtensionUnavailable with
# the reason and the fix; status() is (True, "") or (False, reason); _outcome() is (path or None,
# reason), computed once per process.
load_library, status, _outcome = entry_points(lambda: _load())
