"""The built-in default: a small LLaMA (grouped-query attention, two layers) and a LoRA adapter for it.

Generated deterministically from fixed seeds, so ``romac compile`` with no model argument works on a fresh
machine with nothing downloaded, and ``romac verify`` can rebuild exactly the same source.
Weights are scaled like a trained model's (unit-variance activations, logits with a clear winner), so greedy
decoding is well defined rather than a coin toss between near-equal logits.
"""

from __future__ import annotations

import numpy as np

from romac.ir import (
    PROJECTIONS,
    ArrayWeight,
    LoraAdapter,
    Model,
    ModelConfig,
    expected_shape,
    make_model,
    projection_tensor,
    tensor_names,
)

BUILTIN_MODEL = "builtin"
BUILTIN_ADAPTER = "builtin"

BUILTIN_CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,  # not a multiple of the tile width: exercises edge tiles and partial groups
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)


def random_weights(config: ModelConfig, seed: int) -> dict[str, ArrayWeight]:
    """Deterministic weights for any config: projections ~ N(0, 1/in), norms near 1, embeddings ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name in tensor_names(config):
        shape = expected_shape(config, name)
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("embed_tokens", "lm_head"):
            w = rng.standard_normal(shape) * (1.0 if name == "embed_tokens" else 2.0 / np.sqrt(shape[1]))
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = ArrayWeight(name, w.astype(np.float32), source=f"{BUILTIN_MODEL}:{name}")
    return weights


def random_adapter(
    config: ModelConfig, name: str, seed: int, rank: int = 8, alpha: float = 16.0, modules=PROJECTIONS
) -> LoraAdapter:
    """A LoRA adapter with non-zero A and B on the given projections of every layer."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(config.num_layers):
        for module in modules:
            out_f, in_f = config.projection_shape(module)
            tensor = projection_tensor(layer, module)
            a = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
            b = (rng.standard_normal((out_f, rank)) * 0.05).astype(np.float32)
            weights[tensor] = (ArrayWeight(f"{tensor}.lora_A", a), ArrayWeight(f"{tensor}.lora_B", b))
    return LoraAdapter(name, rank, alpha, False, weights, source=f"{BUILTIN_MODEL}:adapter:{name}")


def builtin_model(with_adapter: bool = True) -> Model:
    """The built-in default model, with its built-in adapter."""
    adapters = (random_adapter(BUILTIN_CONFIG, BUILTIN_ADAPTER, seed=1),) if with_adapter else ()
    return make_model(
        BUILTIN_CONFIG,
        random_weights(BUILTIN_CONFIG, seed=0),
        adapters,
        source={"kind": "builtin", "path": BUILTIN_MODEL},
    )
