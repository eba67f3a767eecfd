"""Builds metricloss_kernels and its C++ extension ``metricloss_kernels._C`` (csrc/).

The CUDA sources (csrc/cuda/) are compiled only when a CUDA toolkit and a GPU are present at build time.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    # no FMA contraction: the exact knn distances are summed like the torch path, bit for bit
    extra = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and CUDA_HOME is not None and torch.cuda.is_available() \
        and os.environ.get("METRICLOSS_NO_CUDA", "0") != "1"
    if use_cuda:
        extra["nvcc"] = ["-O3"]
        extra["cxx"].append("-DWITH_CUDA")
        return [CUDAExtension("metricloss_kernels._C", sources + cuda_sources,
                              extra_compile_args=extra, extra_link_args=["-fopenmp"])]
    return [CppExtension("metricloss_kernels._C", sources,
                         extra_compile_args=extra, extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
