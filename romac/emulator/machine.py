"""The machine: ROM banks, SRAM, activation buffers and the program, run step by step.

It is built from an artifact directory alone (checked against its manifest first) and never sees the
source checkpoint or the IR. ``step`` runs the program once over T new tokens (prefill: the prompt;
decode: one token), appending their K and V to the cache in SRAM and returning their logits.
"""

from __future__ import annotations

import queue
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from romac.artifacts import open_artifacts
from romac.emulator.ops import SEMANTICS
from romac.emulator.rom import Rom
from romac.emulator.sram import Sram
from romac.errors import RomacError
from romac.spec import isa
from romac.spec.formats import element_format
from romac.spec.manifest import PROGRAM_BIN


def _helper(jobs: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    """A helper thread: computes ``out = x @ w`` blocks until it is handed None (numpy releases the GIL)."""
    while (job := jobs.get()) is not None:
        x, w, out = job
        try:
            np.matmul(x, w, out=out)
            done.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            done.put(e)


def _stop_helpers(helpers: list) -> None:
    for jobs, _ in helpers:
        jobs.put(None)


class Machine:
    #: With threads > 1, single-position products over at least this many bytes of weights are split. Each
    #: split costs a hand-off (tens of µs, more when the helper has to wait for a core), so only products that
    #: stream for milliseconds are worth it: SmolLM2's 113 MB head, not its 1-4 MB projections (measured in
    #: docs/performance.md).
    split_bytes = 16 << 20

    def __init__(self, artifacts: str | Path, adapter: str | None = None, threads: int = 1) -> None:
        self.manifest = open_artifacts(artifacts)
        root = Path(self.manifest.root)
        self.config = self.manifest.model
        for part in ("activations", "accumulator"):  # the datapath precisions this machine computes in
            if element_format(self.manifest.target[part]).dtype is not np.float32:
                raise RomacError(f"the target's {part} precision is {self.manifest.target[part]}; this emulator "
                                 "computes in fp32", where=str(root))
        self.rom = Rom(root, self.manifest)
        self.sram = Sram(root, self.manifest)
        self.program = isa.decode((root / PROGRAM_BIN).read_bytes(), source=str(root / PROGRAM_BIN))
        isa.validate(self.program)
        self._handlers: list[tuple[Callable, isa.Instr]] = [(SEMANTICS[i.op], i) for i in self.program if i.op != isa.Opcode.HALT]
        self._weights_t: dict[int, np.ndarray] = {}
        self._rope: dict[int, np.ndarray] = {}
        self._rope_step: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.buf: dict[int, np.ndarray] = {}
        self.pos0 = 0
        self.sram.load_adapter(adapter)
        # Threads per step. BLAS always runs with one: OpenBLAS' spinning threads make small matrix-vector
        # products many times slower whenever another process holds a core (measured: docs/performance.md).
        # With threads > 1, decode steps split their large matrix-vector products by output columns over
        # that many threads of their own (threads - 1 helpers that block, never spin, while idle).
        if threads < 1:
            raise RomacError(f"threads must be at least 1, not {threads}", where="threads")
        self.threads = threads
        self._blas = ThreadpoolController()
        self._helpers: list[tuple[queue.SimpleQueue, queue.SimpleQueue]] = []

    @property
    def adapter(self) -> str | None:
        return self.sram.adapter

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def weight_t(self, rid: int) -> np.ndarray:
        """W^T of a matrix region, decoded once (row-vector activations multiply it from the left).

        Kept only in this [in, out] C-contiguous layout (the ROM's decode cache does not keep the [out, in]
        copy too, unless an EMBED reads the same region): ``x @ W^T`` is then one BLAS sgemv over contiguous
        columns, the faster of the two layouts for matrices that stream from memory (docs/performance.md).
        """
        w = self._weights_t.get(rid)
        if w is None:
            w = self._weights_t[rid] = np.ascontiguousarray(self.rom.value(rid, cache=False).T)
        return w

    def matmul_wt(self, x: np.ndarray, rid: int) -> np.ndarray:
        """``x @ W^T`` for a matrix region: one BLAS call, or with ``threads > 1`` and a single position, column
        blocks of it computed at once by the helper threads and this one.

        Only widths that are multiples of 64 are split, into blocks of multiples of 64: OpenBLAS' sgemv then
        computes each output exactly as the single call does, so the result does not depend on ``threads``
        (tests/test_emulator.py checks it bit for bit; other widths can differ in the last bit). Prefill
        (several positions) is never split: a matrix-matrix product's summation order may depend on its width.
        """
        w_t = self.weight_t(rid)
        if self.threads == 1 or x.shape[0] != 1 or w_t.nbytes < self.split_bytes or w_t.shape[1] % 64:
            return x @ w_t
        n = w_t.shape[1]
        cuts = [min(n, (n * k // self.threads) // 64 * 64) for k in range(self.threads + 1)]
        cuts[-1] = n
        if not self._helpers:
            for _ in range(self.threads - 1):
                pair = (queue.SimpleQueue(), queue.SimpleQueue())
                threading.Thread(target=_helper, args=pair, name="romac-emulator-helper", daemon=True).start()
                self._helpers.append(pair)
            weakref.finalize(self, _stop_helpers, list(self._helpers))
        y = np.empty((1, n), np.float32)
        for (jobs, _), lo, hi in zip(self._helpers, cuts, cuts[1:]):
            jobs.put((x, w_t[:, lo:hi], y[:, lo:hi]))
        np.matmul(x, w_t[:, cuts[-2]:], out=y[:, cuts[-2]:])
        errors = [e for _, done in self._helpers if (e := done.get()) is not None]
        if errors:
            raise errors[0]
        return y

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
