"""setuptools hooks only; the project's metadata lives in pyproject.toml.

1. Ship the CUDA extension's sources: csrc/ sits beside the package in the repository, so build_py
   copies it into the wheel as fastmlstm/ops/cuda/csrc/ (an editable install uses csrc/ in place).
2. Optionally build the extension ahead of time: with FASTMLSTM_BUILD_CUDA=1 in the environment,
   the install compiles csrc/ into fastmlstm/ops/cuda/_C.<python tag>.so. PyTorch must be importable
   while building, so turn build isolation off:

       FASTMLSTM_BUILD_CUDA=1 pip install --no-build-isolation .        # or -e .

   The GPU architectures come from TORCH_CUDA_ARCH_LIST, or else from the GPUs visible at install.
   Without the variable nothing is compiled at install and nothing imports torch here; the extension
   is then built on first use (fastmlstm/ops/cuda/build.py).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SHIPPED = (".cpp", ".cu", ".h", ".cuh")
AOT_ENV = "FASTMLSTM_BUILD_CUDA"
# Keep in step with EXTRA_CFLAGS / EXTRA_CUDA_CFLAGS in fastmlstm/ops/cuda/build.py.
EXTRA_COMPILE_ARGS = {"cxx": ["-O3"], "nvcc": ["-O3"]}


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the loader finds csrc/ next to the package in the checkout
        target = Path(self.build_lib) / "fastmlstm" / "ops" / "cuda" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(CSRC.iterdir()):
            if source.suffix in SHIPPED:
                shutil.copy2(source, target / source.name)


def _ahead_of_time():
    if os.environ.get(AOT_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            f"{AOT_ENV}=1 builds the CUDA extension against the installed PyTorch, which this build cannot "
            f"import ({exc}). Install torch first, then: {AOT_ENV}=1 pip install --no-build-isolation ."
        ) from exc
    if torch.version.cuda is None:
        raise SystemExit(f"{AOT_ENV}=1: the installed PyTorch {torch.__version__} is a CPU-only build; "
                         "install a CUDA build of PyTorch first")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        raise SystemExit(f"{AOT_ENV}=1: no GPU is visible to pick the architectures from; set "
                         "TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    extension = CUDAExtension("fastmlstm.ops.cuda._C", sources, include_dirs=[str(CSRC)],
                              extra_compile_args=EXTRA_COMPILE_ARGS)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ahead_of_time()
cmdclass["build_py"] = build_py_with_csrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
