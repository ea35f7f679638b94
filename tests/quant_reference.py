"""The libraries' GPTQ and AWQ dequantization, re-implemented in torch from their sources, for tests on machines
without gptqmodel / AutoGPTQ / AutoAWQ (which need their own venv here: tests/fixtures/quantized_checkpoints.py).

Each function follows one library's algorithm step by step, with the same torch dtypes, so that the float16
roundings happen where the library's happen:

* :func:`gptqmodel_dequant` -- gptqmodel 7.6 ``TorchLinear``: v1 checkpoints converted to v2 on load by adding
  ``0b0001...0001`` (one per field) to each int32 ``qzeros`` word (``convert_gptq_v1_to_v2_format_module``; 3-bit
  per field), codes and zeros unpacked with ``bitwise_right_shift`` then ``& maxq`` in int8 (int16 for 8 bits),
  ``scales[g_idx] * (weight - zeros[g_idx])`` with float16 scales.
* :func:`autogptq_dequant` -- AutoGPTQ 0.7 ``qlinear_cuda_old`` torch path: zeros ``((field as int8) + 1) & maxq``
  per field, then the same product (its own reshape by group needs in % gs == 0; the g_idx form is used here, as
  its exllama/triton kernels and gptqmodel's do).
* :func:`autoawq_dequant` -- AutoAWQ ``dequantize_gemm``: unpack with shifts 0..28, reverse the AWQ order, ``& 15``,
  ``(iweight - izeros) * scales.repeat_interleave(group_size)``.

All return the float32 ``[out, in]`` matrix (the library's ``[in, out]`` result transposed).
"""

from __future__ import annotations

import numpy as np


def _t():
    import torch

    return torch


def _unpack_rows(qweight, bits):
    """int32 [rows, cols] packed along dim 0 -> int [rows * 32 / bits, cols] (3-bit: the 10/1/10/1/10 split)."""
    torch = _t()
    if bits == 3:
        w = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12, 1)
        w = (w >> wf) & 0x7
        w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
        w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
        w = w & 0x7
        return torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1).reshape(-1, qweight.shape[1])
    per = 32 // bits
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(-1)
    dt = torch.int16 if bits == 8 else torch.int8
    w = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, per, -1), wf).to(dt)
    return torch.bitwise_and(w, (1 << bits) - 1).reshape(-1, qweight.shape[1])


def _unpack_cols(qzeros, bits):
    """int32 [rows, cols] packed along dim 1 -> fields [rows, cols * 32 / bits] (not masked for 2/4/8 bits)."""
    torch = _t()
    if bits == 3:
        z = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        z = z >> wf.unsqueeze(0)
        z[:, :, 0, 10] = (z[:, :, 0, 10] & 0x3) | ((z[:, :, 1, 0] << 2) & 0x4)
        z[:, :, 1, 11] = (z[:, :, 1, 11] & 0x1) | ((z[:, :, 2, 0] << 1) & 0x6)
        z = z & 0x7
        return torch.cat([z[:, :, 0, :11], z[:, :, 1, 1:12], z[:, :, 2, 1:11]], dim=2).reshape(qzeros.shape[0], -1)
    per = 32 // bits
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    dt = torch.int16 if bits == 8 else torch.int8
    z = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, per), wf.unsqueeze(0)).to(dt)
    return z.reshape(qzeros.shape[0], -1)


def gptqmodel_dequant(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> np.ndarray:
    torch = _t()
    qweight, qzeros = torch.as_tensor(np.array(qweight)), torch.as_tensor(np.array(qzeros))
    scales, g_idx = torch.as_tensor(np.array(scales)), torch.as_tensor(np.array(g_idx)).long()
    out = scales.shape[1]
    maxq = (1 << bits) - 1
    if v1:
        if bits == 3:   # _correct_gptq_v1_qzeros: decode, +1 & mask per field, repack (equivalent: use the fields)
            z = (_unpack_cols(qzeros, 3)[:, :out].to(torch.int32) + 1) & maxq
        else:
            qzeros = _wrap_int32(qzeros.to(torch.int64) + sum(1 << (i * bits) for i in range(32 // bits)))
            z = torch.bitwise_and(_unpack_cols(qzeros, bits), maxq)[:, :out]
    else:
        z = (_unpack_cols(qzeros, bits) & maxq)[:, :out]
    dt = torch.int16 if bits == 8 else torch.int8
    w = _unpack_rows(qweight, bits)[: g_idx.numel()].to(dt)
    z = z.to(dt)
    res = scales[g_idx] * (w - z[g_idx])
    return res.to(torch.float32).T.contiguous().numpy()


def _wrap_int32(x):
    """int64 -> int32 with two's-complement wrap-around (what an in-place int32 ``+=`` does in torch)."""
    torch = _t()
    x = x.to(torch.int64) & 0xFFFFFFFF
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def autogptq_dequant(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> np.ndarray:
    torch = _t()
    qweight, qzeros = torch.as_tensor(np.array(qweight)), torch.as_tensor(np.array(qzeros))
    scales, g_idx = torch.as_tensor(np.array(scales)), torch.as_tensor(np.array(g_idx)).long()
    out = scales.shape[1]
    maxq = (1 << bits) - 1
    z = _unpack_cols(qzeros, bits)
    if v1:
        z = z + 1
    z = torch.bitwise_and(z, maxq)[:, :out]
    dt = torch.int16 if bits == 8 else torch.int8
    w = _unpack_rows(qweight, bits)[: g_idx.numel()].to(dt)
    res = scales[g_idx] * (w - z.to(dt)[g_idx])
    return res.to(torch.float32).T.contiguous().numpy()


def autoawq_dequant(qweight, qzeros, scales, group_size: int) -> np.ndarray:
    torch = _t()
    qweight, qzeros, scales = (torch.as_tensor(np.array(a)) for a in (qweight, qzeros, scales))
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    order = torch.arange(iw.shape[-1], dtype=torch.int32).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, order] & 15, iz[:, order] & 15
    res = (iw - iz.repeat_interleave(group_size, dim=0)) * scales.repeat_interleave(group_size, dim=0)
    return res.to(torch.float32).T.contiguous().numpy()
