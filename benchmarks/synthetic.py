"""Write synthetic checkpoints with the exact shapes of real LLaMA models, as Hugging Face writes them.

Generated weights (deterministic), sharded fp16 safetensors with ``model.safetensors.index.json``, and a PEFT
LoRA adapter on all seven projections. Used by the compile benchmarks; nothing is downloaded.

    python benchmarks/synthetic.py llama-3.2-1b DIR [--rank 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from romac.frontend.safetensors_io import write_safetensors
from romac.ir import PROJECTIONS, ModelConfig, expected_shape, projection_tensor, tensor_names

SHAPES = {
    # published configs of the real models (config.json on their model cards)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                         num_kv_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
}
SHARD_BYTES = 2 << 30


def config_for(name: str) -> ModelConfig:
    return ModelConfig(rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, **SHAPES[name])


def hf_key(name: str) -> str:
    return "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"


def _fp16_normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float, offset: float) -> np.ndarray:
    """``N(offset, scale²)`` as fp16, drawn in row chunks (the same values as one draw: the generator fills
    arrays in order), so an 8B model's 2 GB embedding never exists in float32."""
    out = np.empty(shape, np.float16)
    flat = out.reshape(shape[0], -1)
    step = max(1, (16 << 20) // max(1, flat.shape[1]))
    for r in range(0, flat.shape[0], step):
        x = rng.standard_normal((min(step, flat.shape[0] - r), flat.shape[1]), dtype=np.float32) * np.float32(scale)
        if offset:
            x += np.float32(offset)
        flat[r : r + x.shape[0]] = x
    return out


def write_checkpoint(name: str, out: Path, seed: int = 0) -> int:
    """Write the checkpoint; returns its parameter count."""
    cfg = config_for(name)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shard, size, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            write_safetensors(out / fname, shard, metadata={"format": "pt"})
            shards.append(fname)
            for k in shard:
                weight_map[k] = fname
            shard, size = {}, 0

    for tensor in tensor_names(cfg):
        shape = expected_shape(cfg, tensor)
        scale = 1.0 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.1
        w = _fp16_normal(rng, shape, scale, 1.0 if len(shape) == 1 else 0.0)
        if size + w.nbytes > SHARD_BYTES:
            flush()
        shard[hf_key(tensor)] = w
        size += w.nbytes
        total += w.size
    flush()
    n = len(shards)
    for i, fname in enumerate(shards):  # HF names shards model-0000i-of-0000n
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / fname).rename(out / final)
        for k, v in weight_map.items():
            if v == fname:
                weight_map[k] = final
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": 1, "eos_token_id": 2,
          "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def write_adapter(name: str, out: Path, rank: int = 16, seed: int = 1) -> None:
    """A PEFT LoRA adapter (as ``save_pretrained`` writes it) on all seven projections."""
    cfg = config_for(name)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in PROJECTIONS:
            out_f, in_f = cfg.projection_shape(module)
            key = f"base_model.model.model.{projection_tensor(layer, module)}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, in_f), dtype=np.float32) / np.sqrt(in_f)).astype(np.float16)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out_f, rank), dtype=np.float32) * 0.01).astype(np.float16)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "target_modules": list(PROJECTIONS), "task_type": "CAUSAL_LM"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    n = write_checkpoint(args.model, args.out / "base")
    write_adapter(args.model, args.out / "adapter", args.rank)
    print(f"wrote {args.model} ({n / 1e9:.3f} B parameters) and a rank-{args.rank} adapter to {args.out}")


if __name__ == "__main__":
    main()
