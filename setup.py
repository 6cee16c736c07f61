"""Builds fastdiff and its extension fastdiff._C (CPU kernels always, CUDA kernels where possible).

FASTDIFF_CUDA=1 forces the CUDA kernels (error if torch or nvcc lacks CUDA), FASTDIFF_CUDA=0 skips
them; by default they are built when torch has CUDA and nvcc is found. Build without isolation so the
installed torch is used: ``pip install --no-build-isolation -e .``
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    flag = os.environ.get("FASTDIFF_CUDA", "")
    if flag == "0":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        raise RuntimeError(
            "FASTDIFF_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. Install a CUDA build of torch "
            "and the CUDA toolkit (nvcc), or unset FASTDIFF_CUDA."
        )
    return have


def extension():
    sources = ["csrc/ops.cpp", "csrc/composite.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC turn float compares into branch-free min/max, which the vectorizer
    # needs; nothing here relies on floating-point traps or errno.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "fastdiff._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTDIFF_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("fastdiff._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["fastdiff", "fastdiff.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
