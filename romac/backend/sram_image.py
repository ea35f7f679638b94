"""One adapter's SRAM image (``sram/<adapter>.bin``): the slot table, then A and B of every slot it has, at the
offsets its :class:`romac.spec.plan.AdapterLayout` gives (layout: romac.spec.layout, docs/artifacts.md)."""

from __future__ import annotations

import struct

import numpy as np

from romac.codecs.elements import encode_lora
from romac.errors import RomacError
from romac.ir import LoraAdapter
from romac.spec.layout import SLOT_ENTRY_BYTES, SLOT_ENTRY_FORMAT
from romac.spec.plan import AdapterLayout, SramMap


def check_finite(w: np.ndarray, name: str, source: str, row0: int = 0) -> None:
    """Refuse NaN/Inf in an array already in memory (no extra pass over the weights), naming the row."""
    if not np.isfinite(w).all():
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
        where_in = f"row {row0 + at[0]}, column {at[1]}" if len(at) == 2 else f"element {row0 + at[0]}" if at else ""
        raise RomacError(
            f"tensor {name!r} holds {w[at]} in {where_in}",
            where=source or name,
            hint="the checkpoint is corrupted or diverged; NaN/Inf weights cannot be quantized",
        )


def sram_image(adapter: LoraAdapter, layout: AdapterLayout, sram: SramMap) -> bytes:
    """The bytes of one adapter's SRAM image."""
    image = bytearray(layout.bytes)
    for e in layout.entries:
        a_h, b_h = adapter.weights[sram.slots[e.slot]]
        a = np.asarray(a_h.load(), np.float32)
        b = np.asarray(b_h.load(), np.float32)
        for arr, h in ((a, a_h), (b, b_h)):
            check_finite(arr, h.name, getattr(h, "source", "") or adapter.source)
        a_bytes, a_scale = encode_lora(a, sram.lora_format)
        b_bytes, b_scale = encode_lora(b, sram.lora_format)
        image[e.a_offset : e.a_offset + len(a_bytes)] = a_bytes
        image[e.b_offset : e.b_offset + len(b_bytes)] = b_bytes
        struct.pack_into(SLOT_ENTRY_FORMAT, image, e.slot * SLOT_ENTRY_BYTES, a_scale, b_scale, adapter.scaling, e.rank)
    return bytes(image)
