"""setuptools hooks only; the project's metadata lives in pyproject.toml.

1. Ship the extensions' sources: csrc/ sits beside the package in the repository, so build_py
   copies csrc/*.{cpp,cu,h,cuh} into the wheel as fastmlstm/ops/cuda/csrc/ and csrc/cpu/ as
   fastmlstm/ops/cpu/csrc/ (an editable install uses csrc/ in place).
2. Optionally build the extensions ahead of time. PyTorch must be importable while building, so
   turn build isolation off:

       FASTMLSTM_BUILD_CUDA=1 pip install --no-build-isolation .   # CUDA: fastmlstm/ops/cuda/_C.<tag>.so
       FASTMLSTM_BUILD_CPU=1 pip install --no-build-isolation .    # CPU:  fastmlstm/ops/cpu/_C.<tag>.so

   (both at once works too; `-e .` as well). The GPU architectures come from TORCH_CUDA_ARCH_LIST,
   or else from the GPUs visible at install. Without the variables nothing is compiled at install
   and nothing imports torch here; the extensions are then built on first use
   (fastmlstm/ops/cuda/build.py, fastmlstm/ops/cpu/build.py).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CSRC_CPU = CSRC / "cpu"
SHIPPED = (".cpp", ".cu", ".h", ".cuh")
AOT_ENV = "FASTMLSTM_BUILD_CUDA"
AOT_CPU_ENV = "FASTMLSTM_BUILD_CPU"
# Keep in step with EXTRA_CFLAGS / EXTRA_CUDA_CFLAGS in fastmlstm/ops/cuda/build.py.
EXTRA_COMPILE_ARGS = {"cxx": ["-O3"], "nvcc": ["-O3"]}
# Keep in step with SOURCES (link order) and EXTRA_CFLAGS in fastmlstm/ops/cpu/build.py.
CPU_SOURCES = ("mlstm_cpu.cpp", "buffer_cache.cpp", "pack.cpp", "forward.cpp", "backward.cpp", "gemm.cpp",
               "kernels_default.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")
# -fopenmp as in fastmlstm/ops/cpu/build.py (at::parallel_for needs it compiled in).
CPU_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CPU_COMPILE_ARGS = ["-O3", *CPU_OPENMP]


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the loaders find csrc/ next to the package in the checkout
        for source_dir, package in ((CSRC, "cuda"), (CSRC_CPU, "cpu")):
            target = Path(self.build_lib) / "fastmlstm" / "ops" / package / "csrc"
            target.mkdir(parents=True, exist_ok=True)
            for source in sorted(source_dir.iterdir()):
                if source.is_file() and source.suffix in SHIPPED:
                    shutil.copy2(source, target / source.name)


def _requested(variable):
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


def _import_torch(variable, what):
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            f"{variable}=1 builds the {what} extension against the installed PyTorch, which this build cannot "
            f"import ({exc}). Install torch first, then: {variable}=1 pip install --no-build-isolation ."
        ) from exc
    return torch, cpp_extension


def _cuda_extension():
    torch, cpp_extension = _import_torch(AOT_ENV, "CUDA")
    if torch.version.cuda is None:
        raise SystemExit(f"{AOT_ENV}=1: the installed PyTorch {torch.__version__} is a CPU-only build; "
                         "install a CUDA build of PyTorch first")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        raise SystemExit(f"{AOT_ENV}=1: no GPU is visible to pick the architectures from; set "
                         "TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    return cpp_extension.CUDAExtension("fastmlstm.ops.cuda._C", sources, include_dirs=[str(CSRC)],
                                       extra_compile_args=EXTRA_COMPILE_ARGS)


def _cpu_extension():
    _, cpp_extension = _import_torch(AOT_CPU_ENV, "CPU")
    sources = [str((CSRC_CPU / name).relative_to(ROOT)) for name in CPU_SOURCES]
    return cpp_extension.CppExtension("fastmlstm.ops.cpu._C", sources, include_dirs=[str(CSRC_CPU)],
                                      extra_compile_args={"cxx": CPU_COMPILE_ARGS},
                                      extra_link_args=CPU_OPENMP)


def _ahead_of_time():
    extensions = []
    if _requested(AOT_ENV):
        extensions.append(_cuda_extension())
    if _requested(AOT_CPU_ENV):
        extensions.append(_cpu_extension())
    if not extensions:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ahead_of_time()
cmdclass["build_py"] = build_py_with_csrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
