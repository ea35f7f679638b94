"""SRAM: one flat byte array holding the resident adapter's image and the KV cache.

The adapter region starts at address 0 and holds ``sram/<adapter>.bin`` as written by the emitter (slot
table, then A and B of each slot); the KV cache is a typed view of its region, laid out
[layer][K, V][position][kv_heads × head_dim].
"""

from __future__ import annotations

import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from romac.artifacts import sram_file
from romac.codecs import fp8_e4m3_decode, fp16_decode
from romac.errors import RomacError
from romac.layout import SLOT_ENTRY_FORMAT

KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "fp8_e4m3": ml_dtypes.float8_e4m3fn}
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


class Sram:
    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.map = manifest["sram"]
        cfg = manifest["model"]
        self.bytes = np.zeros(self.map["bytes"], np.uint8)
        kv = self.map["kv"]
        self.kv_format = kv["format"]
        kv_dim = cfg["num_kv_heads"] * cfg["head_dim"]
        view = self.bytes[kv["offset"] : kv["offset"] + kv["bytes"]].view(KV_DTYPES[self.kv_format])
        self.kv = view.reshape(cfg["num_layers"], 2, kv["max_context"], kv_dim)
        self.max_context = kv["max_context"]
        # What attention reads: the stored cache as float32. For fp32 it is the stored words themselves; for
        # fp16/fp8 a decoded copy that store_kv refreshes for the rows it has just written (decoded from the
        # stored bytes, which stay the source of truth), so a step decodes its new rows, not the whole context.
        # np.zeros leaves untouched pages unmapped: the copy costs memory only for the positions used.
        self._kv_f32 = self.kv if self.kv.dtype == np.float32 else np.zeros(self.kv.shape, np.float32)
        self.adapter: str | None = None
        self.lora: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    def load_adapter(self, name: str | None) -> None:
        """Make one adapter resident (its image copied into the adapter region), or none."""
        self.lora = {}
        self.adapter = name
        region = self.map["adapter_region"]
        self.bytes[region["offset"] : region["offset"] + region["bytes"]] = 0
        if name is None:
            return
        layouts = {a["name"]: a for a in self.map["adapters"]}
        if name not in layouts:
            raise RomacError(
                f"no adapter named {name!r} in these artifacts",
                where="--adapter",
                hint=f"compiled adapters: {', '.join(layouts) or 'none'}",
            )
        layout = layouts[name]
        image = np.fromfile(self.root / sram_file(name), dtype=np.uint8)
        self.bytes[region["offset"] : region["offset"] + image.size] = image
        entry = struct.calcsize(SLOT_ENTRY_FORMAT)
        fmt = self.map["lora_format"]
        for slot, a_off, b_off, rank, in_f, out_f in layout["entries"]:
            a_scale, b_scale, scaling, stored_rank = struct.unpack_from(SLOT_ENTRY_FORMAT, self.bytes, slot * entry)
            if stored_rank != rank:
                raise RomacError(f"slot {slot} holds rank {stored_rank}, the manifest says {rank}", where=sram_file(name))
            a = self._matrix(a_off, (rank, in_f), fmt, a_scale)
            b = self._matrix(b_off, (out_f, rank), fmt, b_scale)
            self.lora[slot] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), np.float32(scaling))

    def _matrix(self, offset: int, shape: tuple[int, int], fmt: str, scale: float) -> np.ndarray:
        n = shape[0] * shape[1]
        if fmt == "fp8_e4m3":
            return fp8_e4m3_decode(self.bytes[offset : offset + n], np.float32(scale)).reshape(shape)
        return fp16_decode(self.bytes[offset : offset + 2 * n].view("<u2")).reshape(shape)

    def store_kv(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        end = pos0 + k.shape[0]
        if end > self.max_context:
            raise RomacError(
                f"context of {end} tokens exceeds the KV cache of {self.max_context}",
                where="KV cache",
                hint="recompile with a larger --max-context, or use a shorter prompt / fewer new tokens",
            )
        if self.kv_format == "fp8_e4m3":  # saturate like the hardware instead of producing NaN
            k, v = np.clip(k, -FP8_MAX, FP8_MAX), np.clip(v, -FP8_MAX, FP8_MAX)
        self.kv[layer, 0, pos0:end] = k
        self.kv[layer, 1, pos0:end] = v
        if self._kv_f32 is not self.kv:
            self._kv_f32[layer, :, pos0:end] = self.kv[layer, :, pos0:end]

    def read_kv(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of positions [0, end) as float32 [end, kv_dim] (read-only views: do not write to them)."""
        return self._kv_f32[layer, 0, :end], self._kv_f32[layer, 1, :end]
