"""Builds metricloss_kernels and its C++ extension ``metricloss_kernels._C`` (csrc/: the kNN op, CPU kernels with
OpenMP). The package has no CUDA source: its GPU kernels are Triton, compiled at run time."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    # no FMA contraction: the exact knn distances are summed like the torch path, bit for bit
    return [CppExtension("metricloss_kernels._C", sources,
                         extra_compile_args={"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]},
                         extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
