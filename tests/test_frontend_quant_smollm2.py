"""SmolLM2-135M in each quantized format: the fp32 transformers model with the reader's dequantized weights gives
the logits of the library's own dequantized forward (relative error <= 1e-4), with the r=8 LoRA adapter on top.

* GPTQ int4 g128 (576 = 4.5 groups: the last group of every 576-wide row is 64 wide) and AWQ int4 g64 (AWQ needs
  in % gs == 0), written in the libraries' layouts from RTN codes; the library forward is the same transformers
  model with the weights the libraries' dequantization algorithms give (tests/quant_reference.py).
* compressed-tensors W4A16 g64 made by compressed-tensors itself; the library forward is transformers loading the
  compressed checkpoint (CompressedTensorsHfQuantizer, decompressed at float32).

The fixtures are cached (tests/fixtures/quantized_checkpoints.py); the fp32 model is loaded once for the file.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow

from romac.frontend.awq import load_awq_checkpoint  # noqa: E402
from romac.frontend.compressed_tensors import load_compressed_tensors_checkpoint  # noqa: E402
from romac.frontend.gptq import load_gptq_checkpoint  # noqa: E402
from romac.frontend.hf_config import open_checkpoint_files, read_config_json  # noqa: E402
from romac.frontend.qpack import AffineWeight  # noqa: E402
from romac.ir import projection_tensor  # noqa: E402
from tests.fixtures import quantized_checkpoints as qc  # noqa: E402
from tests.quant_reference import autoawq_dequant  # noqa: E402
from tests.test_frontend_gptq import library_dequant  # noqa: E402

IDS = [1, 504, 3458, 282, 3700, 314, 253, 1345, 30, 198, 42, 7]


def _load(loader, root):
    return loader(root, read_config_json(root / "config.json"), open_checkpoint_files(root))


def quantized(model):
    return {n: h for n, h in model.weights.items() if isinstance(h, AffineWeight)}


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.lru_cache(maxsize=1)
def _smollm2_with_adapter():
    """SmolLM2 fp32 in transformers with the r=8 LoRA adapter: loaded once per process (it takes ~20 s)."""
    import peft

    from tests.fixtures.smollm2 import adapter, load_torch_model

    model = load_torch_model()
    torch.set_num_threads(1)   # load_torch_model asks for every core; on a shared 2-core machine one is 10x faster
    return peft.PeftModel.from_pretrained(model, adapter()).eval()


def _torch_logits(weights: dict, ids) -> np.ndarray:
    """Logits of SmolLM2 (+ LoRA adapter) whose base tensors are ``weights`` (every tensor of a romac Model)."""
    pm = _smollm2_with_adapter()
    base = pm.get_base_model()
    with torch.no_grad():
        for name, w in weights.items():
            if name == "rope.inv_freq":
                continue
            mod = base.lm_head if name == "lm_head" else base.get_submodule(f"model.{name}")
            mod = getattr(mod, "base_layer", mod)
            mod.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        return pm(torch.tensor([ids])).logits[0].double().numpy()


def test_smollm2_gptq_logits_match_library_forward():
    """SmolLM2-135M GPTQ int4 g128 (576 = 4.5 groups): the reader's weights in the fp32 transformers model give the
    logits of the library's dequantized weights (gptqmodel's algorithm), with the LoRA adapter on top."""
    root = qc.smollm2_gptq(4, 128)
    m = _load(load_gptq_checkpoint, root)
    hs = quantized(m)
    assert len(hs) == 30 * 7 and all(h.codec_spec == {"format": "int4", "group_size": 128} for h in hs.values())
    assert hs[projection_tensor(0, "q_proj")].load_quantized().params["scale"].shape == (576, 5)
    f = open_checkpoint_files(root)
    lib = {n: library_dequant(f[f"model.{n}.qweight"], f"model.{n}", 4, "gptq", "autogptq") for n in hs}
    ids = IDS
    weights = {n: h.load() for n, h in m.weights.items()}
    ours = _torch_logits(weights, ids)
    ref = _torch_logits({**weights, **lib}, ids)
    assert rel(ours, ref) <= 1e-4
    json.dumps(m.source)   # the summary is plain JSON (the emitter writes it)



def test_smollm2_awq_logits_match_library_forward():
    root = qc.smollm2_awq(64)
    m = _load(load_awq_checkpoint, root)
    hs = quantized(m)
    assert len(hs) == 210 and all(h.codec_spec == {"format": "int4", "group_size": 64} for h in hs.values())
    assert hs[projection_tensor(0, "down_proj")].load_quantized().params["scale"].shape == (576, 24)
    f = open_checkpoint_files(root)
    lib = {}
    for n in hs:
        k = f"model.{n}"
        st = f[f"{k}.qweight"]
        lib[n] = autoawq_dequant(st.raw(f"{k}.qweight"), st.raw(f"{k}.qzeros"), st.raw(f"{k}.scales"), 64)
    ids = IDS
    weights = {n: h.load() for n, h in m.weights.items()}
    ours = _torch_logits(weights, ids)
    ref = _torch_logits({**weights, **lib}, ids)
    assert rel(ours, ref) <= 1e-4


def test_smollm2_ct_logits_match_transformers():
    """SmolLM2-135M W4A16 g64 made by compressed-tensors: transformers' own forward of the compressed checkpoint
    (fp32) vs the fp32 model with the reader's weights, both with the LoRA adapter."""
    import peft

    from tests.fixtures.smollm2 import adapter

    root = qc.smollm2_ct(4, 64, True)
    m = _load(load_compressed_tensors_checkpoint, root)
    hs = quantized(m)
    assert len(hs) == 210 and all(h.codec_spec == {"format": "int4", "group_size": 64} for h in hs.values())
    assert hs[projection_tensor(0, "q_proj")].load_quantized().params["scale"].shape == (576, 9)
    ids = IDS
    torch.manual_seed(0)
    lib = transformers.LlamaForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        lib(torch.tensor([ids[:2]]))   # compressed-tensors decompresses on the first forward
    lib = peft.PeftModel.from_pretrained(lib, adapter()).eval()
    with torch.no_grad():
        ref = lib(torch.tensor([ids])).logits[0].double().numpy()
    ours = _torch_logits({n: h.load() for n, h in m.weights.items()}, ids)
    assert rel(ours, ref) <= 1e-4
