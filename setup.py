"""The C extension romac.emulator._lunit (the emulator's affine product kernel); everything else is in
pyproject.toml. The extension is optional: without a C compiler the install goes on and the numba kernels
compute every product (romac.emulator.kernels)."""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: a product and a sum are each rounded to float32 (no fused multiply-add), the order the
# kernels define; OpenMP spreads rows over threads where the compiler has it (GCC on Linux).
compile_args = ["-O3", "-ffp-contract=off", "-std=c11"]
link_args = []
if sys.platform.startswith("linux"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

setup(ext_modules=[Extension("romac.emulator._lunit", ["romac/emulator/_lunit.c"], extra_compile_args=compile_args,
                             extra_link_args=link_args, optional=True)])
