"""Builds distreward with its C++ extension ``distreward._C`` (every csrc/*.cpp) and ships ``kernels/`` as
``distreward.kernels``. Build without isolation so the extension compiles against the torch you
already have: ``pip install -e . --no-build-isolation``.

The extension is compiled for this machine's vector units (``-march=native``) unless the environment
variable ``DISTREWARD_CPU_ARCH`` says otherwise: ``generic`` adds no ``-march`` (portable wheels), any other
value is passed as ``-march=VALUE`` (e.g. ``x86-64-v3``). When the compiler refuses ``-march=native`` the
build falls back to generic. What was chosen is written next to the extension as
``distreward/_build_info.py`` (``CPU_ARCH``, ``COMPILE_FLAGS``, ``VECTOR_ISA``)."""
import glob
import os
import re
import tempfile

from setuptools import setup
from setuptools.errors import CompileError
from torch.utils.cpp_extension import BuildExtension, CppExtension

ARCH_VARIABLE = "DISTREWARD_CPU_ARCH"
# The compiler's predefined macros that name a vector instruction set, widest first (x86-64, then Arm).
VECTOR_MACROS = ("__AVX512F__", "__AVX512BW__", "__AVX512BF16__", "__AVX2__", "__FMA__", "__AVX__", "__SSE4_2__",
                 "__SSE2__", "__ARM_FEATURE_SVE", "__ARM_NEON")


class BuildForThisCPU(BuildExtension):
    """torch's BuildExtension plus the ``-march`` flag of ``DISTREWARD_CPU_ARCH`` (default ``native``), tried on
    the compiler first; records the choice in ``_build_info.py`` beside the built extension."""

    def build_extensions(self):
        requested = os.environ.get(ARCH_VARIABLE, "native").strip() or "native"
        flags = [] if requested == "generic" else [f"-march={requested}"]
        chosen = requested
        with tempfile.TemporaryDirectory() as scratch:
            probe = os.path.join(scratch, "probe.c")
            with open(probe, "w") as source:
                source.write("int main(void) { return 0; }\n")
            if flags and not self._accepts(probe, scratch, flags):
                if requested != "native":
                    raise SystemExit(f"{ARCH_VARIABLE}={requested}: the compiler refuses -march={requested}")
                flags, chosen = [], "generic (the compiler refused -march=native)"
            isa = self._vector_isa(probe, scratch, flags)
        for extension in self.extensions:
            extension.extra_compile_args = list(extension.extra_compile_args) + flags
        print(f"distreward._C: {ARCH_VARIABLE} {chosen!r}, flags {flags}, vector ISA {' '.join(isa) or 'baseline'}")
        self._write_build_info(chosen, flags, isa)
        super().build_extensions()

    def _accepts(self, probe: str, scratch: str, flags: list) -> bool:
        try:
            self.compiler.compile([probe], output_dir=scratch, extra_postargs=flags)
        except CompileError:
            return False
        return True

    def _vector_isa(self, probe: str, scratch: str, flags: list) -> tuple:
        """The VECTOR_MACROS the compiler defines under ``flags`` (its ``-dM -E`` dump), as names like "AVX2"."""
        dump = os.path.join(scratch, "macros.txt")
        try:
            self.compiler.preprocess(probe, output_file=dump, extra_postargs=flags + ["-dM"])
            with open(dump) as macros:
                defined = set(re.findall(r"^#define (\w+)", macros.read(), flags=re.MULTILINE))
        except (CompileError, OSError):
            return ()
        return tuple(macro.strip("_").removeprefix("ARM_FEATURE_") for macro in VECTOR_MACROS if macro in defined)

    def _write_build_info(self, chosen: str, flags: list, isa: tuple):
        # Beside the extension in the build directory (so wheels carry it); build_ext runs with inplace off here.
        self._build_info = os.path.join(os.path.dirname(self.get_ext_fullpath("distreward._C")), "_build_info.py")
        os.makedirs(os.path.dirname(self._build_info), exist_ok=True)
        with open(self._build_info, "w") as info:
            info.write('"""Written by setup.py when it built distreward._C: how its C++ kernels were compiled."""\n'
                       f"CPU_ARCH = {chosen!r}  # {ARCH_VARIABLE}: native (default), generic or a -march value\n"
                       f"COMPILE_FLAGS = {tuple(flags)!r}\n"
                       f"VECTOR_ISA = {isa!r}  # vector instruction sets the compiler enabled under these flags\n")

    def copy_extensions_to_source(self):
        """Editable installs and --inplace: the record follows the extension into the source tree."""
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("distreward")
        self.copy_file(self._build_info, os.path.join(package_dir, "_build_info.py"), level=self.verbose)


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
    cmdclass={"build_ext": BuildForThisCPU},
)
