"""SRAM: one flat byte array holding the resident adapter's image and the KV cache.

The correction region (when the compile has a low-rank correction of the base) starts at address 0 and holds
``sram/_correction.bin``; the adapter region follows it and holds the resident ``sram/<adapter>.bin`` (each: slot
table, then A and B of each slot, as written by the emitter); the KV cache is a typed view of its region, laid out
[layer][K, V][position][kv_heads × head_dim].
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from romac.codecs.elements import decode_lora, kv_saturate, lora_code_values
from romac.errors import RomacError
from romac.spec.formats import element_format
from romac.spec.layout import SLOT_ENTRY_BYTES, SLOT_ENTRY_FORMAT
from romac.spec.manifest import SRAM_CORRECTION, Manifest, sram_file
from romac.spec.plan import AdapterLayout


def _transposed_codes(codes: np.ndarray, rows: int, cols: int, width: int) -> np.ndarray:
    """The bytes of a [rows, cols] matrix of ``width``-byte codes, in the order of its transpose: [cols, rows * width]."""
    return np.ascontiguousarray(codes.reshape(rows, cols, width).transpose(1, 0, 2)).reshape(cols, rows * width)


class Sram:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.map = manifest.sram
        cfg = manifest.model
        self.bytes = np.zeros(self.map.bytes, np.uint8)
        kv = self.map.kv
        self.kv_format = kv.format
        kv_dim = cfg["num_kv_heads"] * cfg["head_dim"]
        view = self.bytes[kv.offset : kv.offset + kv.bytes].view(element_format(self.kv_format).dtype)
        self.kv = view.reshape(cfg["num_layers"], 2, kv.max_context, kv_dim)
        self.max_context = kv.max_context
        # What attention reads: the stored cache as float32. For fp32 it is the stored words themselves; for
        # fp16/fp8 a decoded copy that store_kv refreshes for the rows it has just written (decoded from the
        # stored bytes, which stay the source of truth), so a step decodes its new rows, not the whole context.
        # np.zeros leaves untouched pages unmapped: the copy costs memory only for the positions used.
        self._kv_f32 = self.kv if self.kv.dtype == np.float32 else np.zeros(self.kv.shape, np.float32)
        self.adapter: str | None = None
        self.lora: dict[int, tuple[np.ndarray, np.ndarray, np.float32]] = {}
        # The same slots as they lie in SRAM, for the native kernel (romac.emulator.vector_unit), which computes
        # from the codes: slot -> (A codes [rank, in], A's scale, B's codes transposed [rank, out], B's scale,
        # scaling), the codes as bytes (B's copied into the order of its rows of B^T); a code's value is
        # code_values[code] * scale.
        self.lora_codes: dict[int, tuple[np.ndarray, float, np.ndarray, float, float]] = {}
        self.correction_codes: dict[int, tuple[np.ndarray, float, np.ndarray, float, float]] = {}
        self.code_values = lora_code_values(self.map.lora_format)
        self.code_bytes = element_format(self.map.lora_format).bytes
        # the base's low-rank correction: loaded once, at address 0, resident whatever the adapter
        self.correction: dict[int, tuple[np.ndarray, np.ndarray, np.float32]] = {}
        if self.map.correction is not None:
            self.correction, self.correction_codes = self._load_image(SRAM_CORRECTION, 0, self.map.correction)

    def _load_image(self, rel: str, offset: int, layout: AdapterLayout) -> tuple[dict, dict]:
        """Copy an SRAM image (slot table, then A and B per slot) to ``offset`` and read its slots: slot ->
        (A^T, B^T, scaling), decoded from the bytes now in SRAM, and slot -> their codes (``lora_codes``)."""
        image = np.fromfile(self.root / rel, dtype=np.uint8)
        self.bytes[offset : offset + image.size] = image
        fmt = self.map.lora_format
        e_fmt = element_format(fmt)
        slots, codes = {}, {}
        for e in layout.entries:
            a_scale, b_scale, scaling, stored_rank = struct.unpack_from(SLOT_ENTRY_FORMAT, self.bytes,
                                                                        offset + e.slot * SLOT_ENTRY_BYTES)
            if stored_rank != e.rank:
                raise RomacError(f"slot {e.slot} holds rank {stored_rank}, the manifest says {e.rank}", where=rel)
            a = decode_lora(self.bytes[offset + e.a_offset:], (e.rank, e.in_features), fmt, a_scale)
            b = decode_lora(self.bytes[offset + e.b_offset:], (e.out_features, e.rank), fmt, b_scale)
            slots[e.slot] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), np.float32(scaling))
            a_at, b_at = offset + e.a_offset, offset + e.b_offset
            width = e_fmt.bytes
            codes[e.slot] = (self.bytes[a_at : a_at + e.rank * e.in_features * width].reshape(e.rank, -1),
                             a_scale if e_fmt.scaled else 1.0,
                             _transposed_codes(self.bytes[b_at : b_at + e.out_features * e.rank * width],
                                               e.out_features, e.rank, width),
                             b_scale if e_fmt.scaled else 1.0, float(np.float32(scaling)))
        return slots, codes

    def load_adapter(self, name: str | None) -> None:
        """Make one adapter resident (its image copied into the adapter region), or none."""
        self.lora, self.lora_codes = {}, {}
        self.adapter = name
        start = self.map.adapter_region_offset
        self.bytes[start : start + self.map.adapter_region_bytes] = 0
        if name is None:
            return
        layout = self.map.adapter(name)
        if layout is None:
            raise RomacError(
                f"no adapter named {name!r} in these artifacts",
                where="--adapter",
                hint=f"compiled adapters: {', '.join(a.name for a in self.map.adapters) or 'none'}",
            )
        self.lora, self.lora_codes = self._load_image(sram_file(name), start, layout)

    def store_kv(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        end = pos0 + k.shape[0]
        if end > self.max_context:
            raise RomacError(
                f"context of {end} tokens exceeds the KV cache of {self.max_context}",
                where="KV cache",
                hint="recompile with a larger --max-context, or use a shorter prompt / fewer new tokens",
            )
        k, v = kv_saturate(k, self.kv_format), kv_saturate(v, self.kv_format)
        self.kv[layer, 0, pos0:end] = k
        self.kv[layer, 1, pos0:end] = v
        if self._kv_f32 is not self.kv:
            self._kv_f32[layer, :, pos0:end] = self.kv[layer, :, pos0:end]

    def kv_snapshot(self, end: int) -> np.ndarray:
        """A float32 copy of the whole cache's positions [0, end): [layers, K/V, end, kv_dim], as stored."""
        return np.array(self._kv_f32[:, :, :end], np.float32)

    def read_kv(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of positions [0, end) as float32 [end, kv_dim] (read-only views: do not write to them)."""
        return self._kv_f32[layer, 0, :end], self._kv_f32[layer, 1, :end]
