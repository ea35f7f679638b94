"""The golden model: the quantized model (plus LoRA) computed in float64 numpy, straight from the IR.

It shares nothing with the emulator but the codecs: weights come from the source checkpoint through the
front-end and are quantized and dequantized by the same codec definitions the compiler used (the formats are
read from the artifacts' manifest), LoRA A/B are rounded to the SRAM precision, and K/V to the KV-cache
precision; everything else is exact float64 arithmetic over the whole sequence at once (no KV cache, no
tiles, no instructions). The emulator must agree with it to float32 rounding.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np

from romac.codecs import get_codec
from romac.codecs.elements import kv_roundtrip, lora_roundtrip
from romac.spec.manifest import Manifest
from romac.ir import ATTN_PROJECTIONS, MLP_PROJECTIONS, ROPE_TABLE, Model, projection_tensor, stores_codes_of


class GoldenModel:
    """float64 forward pass of the quantized model.

    ``formats`` maps each stored tensor to its codec spec (the manifest's regions); ``lora_format`` and
    ``kv_format`` are the target's SRAM precisions. ``adapter`` selects one of the model's adapters or none.
    """

    def __init__(
        self,
        model: Model,
        formats: Mapping[str, dict],
        lora_format: str = "fp32",
        kv_format: str = "fp32",
        adapter: str | None = None,
        keep_weights: bool = True,
    ) -> None:
        self.model = model
        self.keep_weights = keep_weights  # False: read each weight when used (one pass over a big model)
        self.cfg = model.config
        self.formats = formats
        self.kv_format = kv_format
        self.lora_format = lora_format
        self._w: dict[str, np.ndarray] = {}
        self.lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        self._load_adapter(adapter)

    @classmethod
    def of_artifacts(cls, model: Model, manifest: Manifest, adapter: str | None = None,
                     keep_weights: bool = True) -> "GoldenModel":
        """The golden model of what an artifact directory holds: its formats, LoRA and KV precisions."""
        formats = {r.name: r.format.spec() for r in manifest.regions if r.constants_of is None}
        return cls(model, formats, manifest.sram.lora_format, manifest.sram.kv.format, adapter, keep_weights)

    def _load_adapter(self, adapter: str | None) -> None:
        self.lora = {}
        if adapter is None:
            return
        ad = self.model.adapter(adapter)
        scaling = float(np.float32(ad.scaling))
        for tensor, (a, b) in ad.weights.items():
            self.lora[tensor] = (
                lora_roundtrip(a.load(), self.lora_format).astype(np.float64),
                lora_roundtrip(b.load(), self.lora_format).astype(np.float64),
                scaling,
            )

    def with_adapter(self, adapter: str | None) -> "GoldenModel":
        """The same base model with another adapter resident, sharing the dequantized base weights."""
        other = copy.copy(self)
        other._load_adapter(adapter)
        return other

    def weight(self, name: str) -> np.ndarray:
        """A stored tensor as the chip holds it (quantized then dequantized), in float64."""
        w = self._w.get(name)
        if w is None:
            handle = self.model.weights[name]
            codec = get_codec(**self.formats[name])
            if stores_codes_of(handle, self.formats[name]):
                q = handle.load_quantized()  # pre-quantized, compiled to its own format: the stored codes
            else:
                x = np.asarray(handle.load(), np.float32)
                q = codec.quantize(x if x.ndim == 2 else x.reshape(1, -1))
            w = codec.dequantize(q).astype(np.float64).reshape(handle.shape)
            if self.keep_weights:
                self._w[name] = w
        return w

    def _linear(self, x: np.ndarray, layer: int, module: str) -> np.ndarray:
        tensor = projection_tensor(layer, module)
        y = x @ self.weight(tensor).T
        if tensor in self.lora:
            a, b, s = self.lora[tensor]
            y = y + ((x @ a.T) @ b.T) * s
        return y

    def _rmsnorm(self, x: np.ndarray, name: str) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps) * self.weight(name)

    def _rope(self, x: np.ndarray, heads: int) -> np.ndarray:
        t = x.shape[0]
        inv = self.weight(ROPE_TABLE)
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        xh = x.reshape(t, heads, -1)
        half = xh.shape[-1] // 2
        rot = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)
        return (xh * cos[:, None] + rot * sin[:, None]).reshape(t, -1)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, vocab] (float64) of every position of a token sequence, causally."""
        cfg = self.cfg
        ids = np.asarray(tokens, np.int64)
        t, hd = ids.size, cfg.head_dim
        x = self.weight("embed_tokens")[ids]
        causal = np.triu(np.ones((t, t), bool), 1)
        group = cfg.num_heads // cfg.num_kv_heads
        for i in range(cfg.num_layers):
            h = self._rmsnorm(x, f"layers.{i}.input_layernorm")
            q, k, v = (self._linear(h, i, m) for m in ATTN_PROJECTIONS[:3])
            q = self._rope(q, cfg.num_heads)
            k = kv_roundtrip(self._rope(k, cfg.num_kv_heads), self.kv_format)
            v = kv_roundtrip(v, self.kv_format)
            qh = q.reshape(t, cfg.num_heads, hd).transpose(1, 0, 2)
            kh = np.repeat(k.reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2), group, axis=0)
            vh = np.repeat(v.reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2), group, axis=0)
            s = qh @ kh.transpose(0, 2, 1) / np.sqrt(hd)
            s = np.where(causal, -np.inf, s)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            att = (p @ vh).transpose(1, 0, 2).reshape(t, -1)
            x = x + self._linear(att, i, "o_proj")
            h = self._rmsnorm(x, f"layers.{i}.post_attention_layernorm")
            g, u = (self._linear(h, i, m) for m in MLP_PROJECTIONS[:2])
            x = x + self._linear(g / (1 + np.exp(-g)) * u, i, "down_proj")
        h = self._rmsnorm(x, "norm")
        head = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        return h @ self.weight(head).T


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual − reference| / max |reference| over all positions and classes."""
    return float(np.max(np.abs(actual - reference)) / max(np.max(np.abs(reference)), 1e-30))
