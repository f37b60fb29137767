"""Builds distreward with its C++ extension ``distreward._C`` (csrc/) and ships ``kernels/`` as
``distreward.kernels``. Build without isolation so the extension compiles against the torch you
already have: ``pip install -e . --no-build-isolation``."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    packages=["distreward", "distreward.ops", "distreward.kernels"],
    package_dir={"distreward.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            name="distreward._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],  # no-trapping-math: vectorised selects
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
