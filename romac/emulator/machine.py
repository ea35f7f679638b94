"""The machine: ROM banks, SRAM, activation buffers and the program, run step by step.

It is built from an artifact directory alone (checked against its manifest first) and never sees the
source checkpoint or the IR. ``step`` runs the program once over T new tokens (prefill: the prompt;
decode: one token), appending their K and V to the cache in SRAM and returning their logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from romac.artifacts import open_artifacts
from romac.emulator.ops import SEMANTICS
from romac.emulator.rom import Rom
from romac.emulator.sram import Sram
from romac.emulator.vector_unit import native_handlers
from romac.errors import RomacError
from romac.spec import isa
from romac.spec.formats import element_format
from romac.spec.manifest import PROGRAM_BIN


#: how a Machine computes with its matrices: "native" from the packed codes (romac.emulator.kernels: the C kernel
#: where it computes the format, numba elsewhere), "numba" from the packed codes by numba alone (the same bits),
#: "numpy" by decoding each matrix to float32 once and multiplying with BLAS (the readable definition)
KERNELS = ("native", "numba", "numpy")


class Machine:
    #: With threads > 1, products over at least this many multiply-adds are spread over threads; smaller ones run
    #: on the calling thread alone (a parallel launch costs a hand-off: docs/performance.md). The C kernel's own
    #: threads spin a while between products and take a chunk of rows as soon as they see one, so its hand-off is
    #: cheap; numba's wake from sleep at every parallel product.
    parallel_weights = 1 << 16
    numba_parallel_weights = 1 << 20

    def __init__(self, artifacts: str | Path, adapter: str | None = None, threads: int = 1,
                 kernel: str = "native") -> None:
        self.manifest = open_artifacts(artifacts)
        root = Path(self.manifest.root)
        self.config = self.manifest.model
        for part in ("activations", "accumulator"):  # the datapath precisions this machine computes in
            if element_format(self.manifest.target[part]).dtype is not np.float32:
                raise RomacError(f"the target's {part} precision is {self.manifest.target[part]}; this emulator "
                                 "computes in fp32", where=str(root))
        if kernel not in KERNELS:
            raise RomacError(f"unknown kernel {kernel!r}", where="kernel", hint=f"one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.rom = Rom(root, self.manifest)
        self.sram = Sram(root, self.manifest)
        self.program = isa.decode((root / PROGRAM_BIN).read_bytes(), source=str(root / PROGRAM_BIN))
        isa.validate(self.program)
        self._handlers: list[tuple[Callable, isa.Instr]] = (
            native_handlers(self.program, self.sram.code_values, self.sram.code_bytes) if kernel == "native"
            else [(SEMANTICS[i.op], i) for i in self.program if i.op != isa.Opcode.HALT])
        self._weights_t: dict[int, np.ndarray] = {}
        # per matrix region: its product (_plan), and the C kernel's product with a LORA beside it
        self._products: dict[int, tuple[Callable | None, int]] = {}
        self._products_with_lora: dict[int, Callable | None] = {}
        self._rope: dict[int, np.ndarray] = {}
        self._rope_step: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.buf: dict[int, np.ndarray] = {}
        self.pos0 = 0
        self.sram.load_adapter(adapter)
        # Threads: numba's, for the native products (the result does not depend on them). BLAS always runs with
        # one: OpenBLAS' spinning threads make small products many times slower whenever another process holds a
        # core (measured: docs/performance.md).
        if threads < 1:
            raise RomacError(f"threads must be at least 1, not {threads}", where="threads")
        self.threads = threads
        self._numba_threads = 0
        self._blas = ThreadpoolController()

    @property
    def adapter(self) -> str | None:
        return self.sram.adapter

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def weight_t(self, rid: int) -> np.ndarray:
        """W^T of a matrix region decoded to float32 [in, out] once (the numpy kernel only)."""
        w = self._weights_t.get(rid)
        if w is None:
            w = self._weights_t[rid] = np.ascontiguousarray(self.rom.value(rid, cache=False).T)
        return w

    def matmul_wt(self, x: np.ndarray, rid: int) -> np.ndarray:
        """``x @ W^T`` for a matrix region: from the packed codes (native), or decoded and BLAS (numpy)."""
        if self.kernel == "numpy":
            return x @ self.weight_t(rid)
        product, parallel_from = self._plan(rid)
        threads = self.threads if x.shape[0] >= parallel_from else 1
        if product is not None:
            return product(np.ascontiguousarray(x, np.float32), threads)
        self._use_threads(threads)  # numba's thread count
        return self.rom.matmul(rid, x, engine="numba" if self.kernel == "numba" else "auto")

    def matmul_wt_lora(self, x: np.ndarray, rid: int, lora: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        """``x @ W^T`` and, beside it, the scaled delta of a LORA (``lora``: as K.c_product_with_lora takes it) by
        the C kernel, on the threads ``matmul_wt`` would use; None where the C kernel does not compute the region."""
        if rid not in self._products_with_lora:
            self._products_with_lora[rid] = self.rom.product_with_lora(rid)
        product = self._products_with_lora[rid]
        if product is None:
            return None
        threads = self.threads if x.shape[0] >= self._plan(rid)[1] else 1
        return product(np.ascontiguousarray(x, np.float32), threads, lora)

    def _plan(self, rid: int) -> tuple[Callable | None, int]:
        """A matrix region's product: the C kernel's bound product (None: numba's), and from how many positions it
        is spread over the threads."""
        plan = self._products.get(rid)
        if plan is None:
            shape = self.manifest.regions[rid].shape
            product = self.rom.product(rid) if self.kernel == "native" else None
            least = self.parallel_weights if product is not None else self.numba_parallel_weights
            plan = self._products[rid] = (product, -(-least // (shape[0] * shape[1])))
        return plan

    def _use_threads(self, n: int) -> None:
        """numba's thread count for the next products (a per-thread setting, capped by NUMBA_NUM_THREADS)."""
        n = min(n, numba.config.NUMBA_NUM_THREADS)
        if n != self._numba_threads:
            numba.set_num_threads(n)
            self._numba_threads = n

    def embed_rows(self, rid: int, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a matrix region (EMBED): read from the codes of those rows only (native)."""
        if self.kernel == "numpy":
            return self.rom.value(rid)[ids]
        return self.rom.rows(rid, ids)

    def rope_tables(self, rid: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [t, head_dim] at positions pos0 .. pos0+t-1 (angles in float64, like the golden model).

        Computed once per step and table (every layer's q and k rotations of a step share them).
        """
        key = (rid, self.pos0, t)
        hit = self._rope_step.get(key)
        if hit is not None:
            return hit
        inv = self._rope.get(rid)
        if inv is None:
            inv = self._rope[rid] = self.rom.value(rid).astype(np.float64)
        angles = np.arange(self.pos0, self.pos0 + t, dtype=np.float64)[:, None] * inv[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        if len(self._rope_step) > 8:
            self._rope_step.clear()
        hit = self._rope_step[key] = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))
        return hit

    def reset(self, adapter: str | None | type(...) = ...) -> None:
        """Forget the context (and switch adapter when one is given; ``None`` runs the base model)."""
        self.pos0 = 0
        if adapter is not ...:
            self.sram.load_adapter(adapter)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Run the program over len(tokens) new positions; returns their logits [T, vocab] (float32)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise RomacError("no tokens to run", where="--prompt-ids")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise RomacError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})", where="--prompt-ids")
        if self.pos0 + ids.size > self.sram.max_context:
            raise RomacError(
                f"{self.pos0 + ids.size} positions exceed the compiled context of {self.sram.max_context}",
                where="KV cache",
                hint="recompile with a larger --max-context, or ask for fewer tokens",
            )
        self.buf = {isa.Buf.TOK: ids}
        self._numba_threads = 0  # unknown: another Machine on this thread may have changed it
        with self._blas.limit(limits=1, user_api="blas"):
            for handler, instr in self._handlers:
                handler(self, instr)
        self.pos0 += ids.size
        return self.buf[isa.Buf.LOGITS]

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop: int | None = None):
        """Greedy decoding: returns (new token ids, logits of every position, prompt and new, [positions, vocab])."""
        logits = [self.step(prompt)]
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits[-1][-1]))
            new.append(nxt)
            logits.append(self.step([nxt]))
            if stop is not None and nxt == stop:
                break
        return new, np.concatenate(logits, axis=0)
