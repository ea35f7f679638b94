"""The C extensions romac.emulator._lunit (the emulator's affine product kernel) and romac.emulator._vunit (its
per-position instructions); everything else is in pyproject.toml. Both are optional: without a C compiler the
install goes on, the numba kernels compute every product (romac.emulator.kernels) and romac.emulator.ops every
other instruction."""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: a product and a sum are each rounded to float32 (no fused multiply-add), the order the
# kernels define. Its threads are POSIX threads of its own (romac/emulator/_lunit_pool.h says why not OpenMP);
# on Windows it computes on the calling thread.
compile_args = ["-O3", "-ffp-contract=off", "-std=c11"]
link_args = []
if sys.platform != "win32":
    compile_args.append("-pthread")
    link_args.append("-pthread")

setup(ext_modules=[
    Extension("romac.emulator._lunit", ["romac/emulator/_lunit.c", "romac/emulator/_lunit_pool.c"],
              depends=["romac/emulator/_lunit_pool.h", "romac/emulator/_lunit_gemm.h", "romac/emulator/_vunit_sums.h"], extra_compile_args=compile_args,
              extra_link_args=link_args, optional=True),
    # the per-position instructions (RMSNORM, ROPE, LORA, ATTN) of the native kernel: romac/emulator/vector_unit.py
    Extension("romac.emulator._vunit", ["romac/emulator/_vunit.c"], depends=["romac/emulator/_vunit_sums.h"],
              extra_compile_args=compile_args, extra_link_args=link_args, optional=True),
])
