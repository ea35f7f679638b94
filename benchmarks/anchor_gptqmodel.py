"""GPTQ from an established implementation (gptqmodel), run in its own venv by quant_accuracy.py.

    /work/venv-gptqmodel/bin/python benchmarks/anchor_gptqmodel.py MODEL_DIR CALIB.json OUT.safetensors BITS GROUP

gptqmodel 7.6 (7.7 needs torch >= 2.14.1, i.e. a CUDA build) on the CPU: asymmetric (sym=False), groups of GROUP
along the input with ceil(in / GROUP) groups (SmolLM2's 576 = 4.5 x 128 is fine), no act-order, its default
min/max quantizer and 1% dampening, calibrated on the token sequences in CALIB.json. Writes the dequantized
projection weights of the packed result (``dequantize_weight()`` of each quantized linear), named like romac's
tensors, to OUT.
"""

import json
import sys
import time

import torch


def _unpack(packed: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """int32 words -> fields, LSB first, along ``axis`` (0: rows of words, 1: columns of words)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    if axis == 0:
        f = (p[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return f.reshape(-1, p.shape[1])
    f = (p[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return f.reshape(p.shape[0], -1)


def _dequantize(mod) -> torch.Tensor:
    """[in, out] weights from the packed GPTQ buffers, unpacked field by field (FACTS.md section 7).

    Freshly packed modules hold GPTQ v1 zeros (zero - 1, per field); gptqmodel's dequantize_weight() expects v2
    (true zeros, as after loading a checkpoint) and puts every weight one step too high. Unpacking each field
    and adding 1 modulo 2^bits gives the true zero without the carry a packed-word "+ 0x11111111" would cause.
    """
    bits = mod.bits
    q = _unpack(mod.qweight, bits, 0)[: mod.in_features]
    z = _unpack(mod.qzeros, bits, 1)[:, : mod.out_features]
    if mod.qzero_format() == 1:
        z = (z + 1) & ((1 << bits) - 1)
    g = mod.g_idx.long()
    return mod.scales.float()[g] * (q - z[g]).float()


def main() -> None:
    model_dir, calib, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import save_file

    seqs = json.load(open(calib))
    cal = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs]
    cfg = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=False, damp_percent=0.01, offload_to_disk=False)
    model = GPTQModel.load(model_dir, cfg, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    model.quantize(cal, batch_size=1)
    seconds = time.perf_counter() - t0
    tensors = {}
    for name, mod in model.model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            w = _dequantize(mod).T if hasattr(mod, "qweight") else mod.weight
            w = w.detach().float()
            assert tuple(w.shape) == (mod.out_features, mod.in_features), (name, tuple(w.shape))
            tensors[name.removeprefix("model.")] = w.contiguous()
    save_file(tensors, out, metadata={"seconds": f"{seconds:.1f}"})
    print(json.dumps({"seconds": seconds, "tensors": len(tensors)}))


if __name__ == "__main__":
    main()
