"""The base's low-rank correction in SRAM: laid out, scheduled (lora ..., corr), emulated, counted by the report and
the performance model, kept when adapters change, and sized by the capacity errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from romac.adapters import add_adapter
from romac.artifacts import open_artifacts
from romac.driver import compile_model
from romac.emulator import Machine
from romac.errors import CapacityError
from romac.ir import PROJECTIONS, ArrayWeight, LoraAdapter, projection_tensor
from romac.passes import CompileOptions
from romac.reference import GoldenModel, relative_error
from romac.spec.isa import FLAG_CORRECTION, Opcode, decode
from romac.spec.manifest import SRAM_CORRECTION
from romac.targets import load_target
from tests.conftest import small_config, small_model

f32 = np.float32


def correction_for(config, ranks: dict[str, int], seed: int = 5) -> LoraAdapter:
    """A correction as the quantizer hands it over: per projection L2 [r, in] (as A) and L1 [out, r] (as B)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for tensor, r in ranks.items():
        out_f, in_f = config.projection_shape(tensor.rsplit(".", 1)[1])
        weights[tensor] = (ArrayWeight(f"{tensor}.l2", (rng.standard_normal((r, in_f)) / np.sqrt(in_f)).astype(f32)),
                           ArrayWeight(f"{tensor}.l1", (rng.standard_normal((out_f, r)) * 0.05).astype(f32)))
    top = max(ranks.values())
    return LoraAdapter("correction", top, float(top), False, weights)


def _ranks(config) -> dict[str, int]:
    # different ranks per matrix (as a bit allocation would give), some projections uncorrected
    return {projection_tensor(layer, m): 2 + (layer + k) % 3 * 2 for layer in range(config.num_layers)
            for k, m in enumerate(PROJECTIONS) if m != "v_proj"}


@pytest.fixture
def corrected(tmp_path):
    config = small_config()
    model = dataclasses.replace(small_model(config, adapters=2), correction=correction_for(config, _ranks(config)))
    compile_model(model, tmp_path / "out", None, CompileOptions(quant="int4"))
    return model, tmp_path / "out"


def test_layout_program_and_files(corrected):
    model, out = corrected
    m = open_artifacts(out)
    corr = m.sram.correction
    assert corr is not None and SRAM_CORRECTION in m.files
    assert {m.sram.slots[e.slot]: e.rank for e in corr.entries} == _ranks(model.config)
    assert m.sram.adapter_region_offset >= corr.bytes and m.sram.adapter_region_offset % m.sram.align == 0
    assert m.sram.kv.offset >= m.sram.adapter_region_offset + m.sram.adapter_region_bytes
    program = decode((out / "program.bin").read_bytes())
    corr_ins = [i for i in program if i.op == Opcode.LORA and i.flags & FLAG_CORRECTION]
    assert {m.sram.slots[i.a] for i in corr_ins} == set(_ranks(model.config))
    for k, ins in enumerate(program):  # matvec, lora corr, lora: the correction sits between the two
        if ins in corr_ins:
            assert program[k - 1].op == Opcode.MATVEC and program[k + 1].op == Opcode.LORA
    assert "corr" in (out / "program.asm").read_text()


@pytest.mark.parametrize("adapter", [None, "ad0", "ad1"])
def test_emulator_equals_golden_with_correction(corrected, adapter):
    model, out = corrected
    machine = Machine(out, adapter=adapter)
    prompt = [1, 17, 33, 60, 91]
    new, logits = machine.generate(prompt, 4)
    golden = GoldenModel.of_artifacts(model, machine.manifest, adapter=adapter)
    ref = golden.logits(prompt + new)
    assert relative_error(logits, ref) <= 1e-5
    # and the correction matters: without it the golden model is somewhere else
    plain = GoldenModel.of_artifacts(dataclasses.replace(model, correction=None), machine.manifest, adapter=adapter)
    assert relative_error(plain.logits(prompt + new), ref) > 1e-3


def test_report_and_performance_count_it(corrected, tmp_path):
    model, out = corrected
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["sram"]["correction"]["ranks"] == _ranks(model.config)
    plain = tmp_path / "plain"
    compile_model(dataclasses.replace(model, correction=None), plain, None, CompileOptions(quant="int4"))
    rep0 = json.loads((plain / "report.json").read_text())
    assert rep["sram"]["longest_context"] < rep0["sram"]["longest_context"]
    assert rep["performance"]["per_token"]["correction_sram_bytes"] > 0
    slow = rep["performance"]["decode"][0]["cycles"]
    assert slow >= rep0["performance"]["decode"][0]["cycles"]


def test_capacity_error_names_the_rank_that_fits(tmp_path):
    config = small_config()
    big = {t: 64 for t in _ranks(config)}
    model = dataclasses.replace(small_model(config, adapters=0), correction=correction_for(config, big))
    target = dataclasses.replace(load_target("tiny"), sram_bytes=120_000)
    with pytest.raises(CapacityError, match=r"--correction-rank \d+ or less") as e:
        compile_model(model, tmp_path / "out", target, CompileOptions(quant="int4", max_context=64))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_adding_an_adapter_keeps_the_correction(corrected, tmp_path):
    """adapter add on a corrected ROM: the correction image and region stay; the new adapter (ad0's weights, written
    as a PEFT adapter) computes what ad0 compiled in computes."""
    import json

    from romac.frontend.safetensors_io import write_safetensors

    model, out = corrected
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = open_artifacts(copy)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    ad = model.adapters[0]
    tensors = {}
    for tensor, (a, b) in ad.weights.items():
        key = f"base_model.model.model.{tensor}"
        tensors[f"{key}.lora_A.weight"] = a.load()
        tensors[f"{key}.lora_B.weight"] = b.load()
    write_safetensors(peft_dir / "adapter_model.safetensors", tensors)
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": ad.rank, "lora_alpha": ad.alpha, "target_modules": list(PROJECTIONS),
         "use_rslora": False, "bias": "none", "lora_dropout": 0.0}))
    add_adapter(copy, "again", peft_dir)
    after = open_artifacts(copy)
    assert after.sram.correction == before.sram.correction
    assert (copy / SRAM_CORRECTION).read_bytes() == (out / SRAM_CORRECTION).read_bytes()
    a = Machine(copy, adapter="again").step([1, 2, 3])
    b = Machine(out, adapter=ad.name).step([1, 2, 3])
    assert np.array_equal(a, b)


def test_export_base_includes_the_correction(corrected, tmp_path):
    """The exported base is what the chip computes: ROM weights plus the correction decoded from SRAM."""
    import json

    from safetensors.numpy import load_file

    from romac.codecs import codec_for
    from romac.emulator.rom import Rom
    from romac.export import export_base

    model, out = corrected
    export_base(out, tmp_path / "base")
    weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    m = open_artifacts(out)
    rom = Rom(Path(m.root), m)
    ids = m.region_ids()
    for tensor, (l2, l1) in model.correction.weights.items():
        rom_w = codec_for(m.regions[ids[tensor]].format).dequantize(rom.quantized(ids[tensor])).astype(np.float64)
        got = weights[f"model.{tensor}.weight"].astype(np.float64)
        want = rom_w + l1.load().astype(np.float64) @ l2.load().astype(np.float64)
        # the SRAM holds the factors in FP8 E4M3 (3 mantissa bits: relative rounding up to 2^-4 per factor)
        delta = l1.load().astype(np.float64) @ l2.load().astype(np.float64)
        assert np.abs(got - want).max() <= 0.15 * np.abs(delta).max()
        assert np.abs(got - rom_w).max() > 0.5 * np.abs(delta).max()
    uncorrected = [t for t in (projection_tensor(0, "v_proj"),)]
    for tensor in uncorrected:
        rom_w = codec_for(m.regions[ids[tensor]].format).dequantize(rom.quantized(ids[tensor]))
        assert np.array_equal(weights[f"model.{tensor}.weight"], rom_w.astype(np.float32))
    note = json.loads((tmp_path / "base" / "romac_base.json").read_text())
    assert note["correction_merged"] == sorted(model.correction.weights)


@pytest.mark.parametrize("as_lora", [False, True])
def test_exported_base_computes_what_the_chip_computes(corrected, tmp_path, as_lora):
    """transformers (+ peft for the LoRA form) on the export gives the emulator's logits: the corrected base. Both
    are float32 forwards with other summation orders (and the merge rounds W + BA once to float32), hence 1e-4."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from romac.export import export_base

    model, out = corrected
    lora = tmp_path / "corr-lora" if as_lora else None
    export_base(out, tmp_path / "base", correction_as_lora=lora)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    if as_lora:
        hf = peft.PeftModel.from_pretrained(hf, lora).eval()
    prompt = [1, 17, 33, 60, 91]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    got = Machine(out).step(prompt)
    assert relative_error(got, ref) <= 1e-4
    uncorrected = GoldenModel.of_artifacts(dataclasses.replace(model, correction=None), open_artifacts(out))
    assert relative_error(uncorrected.logits(prompt), ref) > 1e-3
