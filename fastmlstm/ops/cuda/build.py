"""Finds, builds and loads the C++/CUDA extension compiled from ``csrc/``.

The extension registers two operators, ``torch.ops.fastmlstm_cuda.forward`` and ``.backward``
(``TORCH_LIBRARY`` in ``csrc/mlstm.cpp``). It comes from one of two places, tried in order:

1. an ahead-of-time build, ``fastmlstm/ops/cuda/_C.<python tag>.so``, made at install time with
   ``FASTMLSTM_BUILD_CUDA=1 pip install --no-build-isolation .`` (see ``setup.py``); skipped when the
   sources beside it are newer (an editable checkout that changed since);
2. a build on first use with :func:`torch.utils.cpp_extension.load` (ninja), cached in
   ``$TORCH_EXTENSIONS_DIR/fastmlstm_cuda/<python>-<torch>-<cuda>-<archs>-<place>/`` (default root
   ``~/.cache/torch_extensions``). The architectures are those of the visible GPUs, or
   ``TORCH_CUDA_ARCH_LIST`` when it is set; each combination gets its own directory, so switching
   GPUs never loads a library built for another one; the place (the sources' folder and torch's
   installation) keeps two checkouts or environments from rebuilding one directory in turn.

The sources are ``fastmlstm/ops/cuda/csrc/`` in an installed wheel (``setup.py`` copies them there)
and ``csrc/`` at the top of the repository in an editable install or a checkout.

A build that fails raises :class:`ExtensionUnavailable` with the compiler's error and how to fix
it; :func:`status` turns that into ``(False, reason)`` so that ``backend="auto"`` falls back.
"""

from __future__ import annotations

import logging
import os
import re
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
    "ExtensionUnavailable",
    "build_directory",
    "load_library",
    "source_dir",
    "sources",
    "status",
]

logger = logging.getLogger("fastmlstm")

# The TORCH_LIBRARY namespace of csrc/mlstm.cpp, and the name of the JIT-built library.
LIBRARY = "fastmlstm_cuda"
# The ahead-of-time build: fastmlstm/ops/cuda/_C<suffix> (setup.py builds it under this name).
AOT_MODULE = "_C"
AOT_ENV = "FASTMLSTM_BUILD_CUDA"
SOURCE_SUFFIXES = (".cpp", ".cu")
# Compiler flags on top of torch.utils.cpp_extension's own (C++ standard, -fPIC, the half/bfloat16
# defines, -gencode per architecture). setup.py passes the same to the ahead-of-time build.
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_dir() -> Path:
    """The directory holding the extension's sources: the wheel's copy, else the checkout's csrc/."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parents[2] / "csrc"):
        if (candidate / "mlstm.cpp").is_file():
            return candidate
    raise ExtensionUnavailable(
        f"the extension's sources are not installed (looked in {_PACKAGE_DIR / 'csrc'} and "
        f"{_PACKAGE_DIR.parents[2] / 'csrc'}); reinstall fastmlstm from a wheel or a checkout that has csrc/"
    )


def sources(directory: Path | None = None) -> list[Path]:
    """Every translation unit of the extension (the .cpp and .cu files), sorted."""
    directory = source_dir() if directory is None else directory
    return sorted(p for p in directory.iterdir() if p.suffix in SOURCE_SUFFIXES)


def _arch_tag() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return "arch-" + re.sub(r"[^0-9A-Za-z.+]+", "_", archs)
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "sm" + "_".join(f"{major}{minor}" for major, minor in capabilities)


def build_directory() -> Path:
    """Where the first-use build goes: one directory per Python, torch, CUDA, GPU architectures and
    place (the sources' folder and torch's installation, :func:`~fastmlstm.ops._extension.place_key`)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"{python}-torch{torch.__version__}-cu{torch.version.cuda}-{_arch_tag()}-{place_key(source_dir())}"
    return Path(root) / LIBRARY / re.sub(r"[^0-9A-Za-z.+_-]+", "_", key)


def _newest_source_mtime(directory: Path) -> float:
    files = [p for p in directory.iterdir() if p.suffix in SOURCE_SUFFIXES + (".h", ".cuh")]
    return max(p.stat().st_mtime for p in files)


def _is_stale(library: Path, src_dir: Path) -> bool:
    return not library.is_file() or library.stat().st_mtime < _newest_source_mtime(src_dir)


def _preflight() -> None:
    """Reasons the extension cannot work here at all, found without compiling anything."""
    if torch.version.cuda is None:
        raise ExtensionUnavailable(
            f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build of PyTorch"
        )
    if not torch.cuda.is_available():
        raise ExtensionUnavailable("no CUDA device is visible (torch.cuda.is_available() is False)")


def _build_failure(error: BaseException, build_dir: Path) -> str:
    """The reason shown for a failed build: the compiler's own error lines, then the fix."""
    from torch.utils import cpp_extension

    excerpt = compiler_errors(error, skip=lambda line: line.lstrip().startswith("/usr"))
    return (
        f"building the CUDA extension failed:\n{excerpt}\n"
        f"Fix: use an nvcc whose CUDA version matches PyTorch's (torch.version.cuda = {torch.version.cuda}; "
        f"nvcc found under CUDA_HOME = {cpp_extension.CUDA_HOME}), with a host compiler that nvcc supports "
        "(set CC to choose one), ninja installed (pip install ninja), and TORCH_CUDA_ARCH_LIST either unset or "
        f"naming your GPU (e.g. '9.0'); then delete {build_dir} and retry. Meanwhile backend='auto' uses the "
        "other backends."
    )


def _jit_build() -> str:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed; install it with `pip install ninja`")
    if cpp_extension.CUDA_HOME is None:
        raise ExtensionUnavailable(
            f"nvcc was not found; install the CUDA toolkit {torch.version.cuda} and set CUDA_HOME to it"
        )
    src_dir = source_dir()
    build_dir = build_directory()
    def announce() -> str | None:
        return None if not _is_stale(build_dir / f"{LIBRARY}.so", src_dir) else (
            f"fastmlstm: compiling the CUDA extension from {src_dir} into {build_dir} (first use; takes a minute or two)")

    return build_with_torch(LIBRARY, sources(src_dir), build_dir, announce=announce, failure=_build_failure,
                            extra_cflags=EXTRA_CFLAGS, extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
                            extra_include_paths=[str(src_dir)])


def _load() -> str:
    _preflight()
    return load_prebuilt_or_build("CUDA", aot_library(_PACKAGE_DIR, AOT_MODULE),
                                  lambda lib: not _is_stale(lib, source_dir()), _jit_build)


# load_library() loads the extension, building it on first use, or raises ExtensionUnavailable with
# the reason and the fix; status() is (True, "") or (False, reason); _outcome() is (path or None,
# reason), computed once per process.
load_library, status, _outcome = entry_points(lambda: _load())
