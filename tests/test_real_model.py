"""The real model end to end: SmolLM2-135M-Instruct with a peft LoRA adapter (r=8, all seven projections).

Each input kind a user brings — the transformers checkpoint, a torch.onnx export, the GGUF file and the
bitsandbytes 4-bit checkpoint — is compiled, and for NF4, INT4 and INT2:
- the emulator matches the golden reference (relative logit error ≤ 1e-5, identical greedy tokens);
- the emulator's teacher-forced predictions over 256 tokens of real English text are compared with
  onnxruntime running a torch.onnx export of the FP32 model (the adapter merged in for the adapter rows).

The emulator must reproduce the quantized model's distance from FP32 exactly (the golden model's agreement
with onnxruntime, to one position in 256); how far each format is from FP32 is then a property of the format,
and the thresholds below are what those formats give on this model (docs/accuracy.md has the figures).
The fixtures (downloading the wheel, exporting ONNX) are built once per machine and cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("onnxscript")

from romac.driver import compile_checkpoint  # noqa: E402
from romac.emulator import Machine  # noqa: E402
from romac.onnx_reference import _perplexity, kl_divergence, top1_agreement  # noqa: E402
from romac.passes import CompileOptions  # noqa: E402
from romac.reference import GoldenModel  # noqa: E402
from romac.verify import source_model, verify  # noqa: E402
from tests.fixtures import onnx_exports, quantized_checkpoints, smollm2  # noqa: E402

TARGET = str(Path(__file__).resolve().parents[1] / "benchmarks" / "targets" / "bench-1g.toml")
TEXT_TOKENS = 256  # positions compared (the issue asks for at least 256)
# Teacher-forced top-1 agreement with FP32 that each format must reach on this model (measured: NF4 0.64,
# INT4 0.63 with an INT8 embedding/head; INT2 g128 destroys a 135M model without calibration: ~0.01).
MIN_AGREEMENT = {"nf4": 0.55, "int4": 0.55, "int2": 0.0}
EMBEDDING = "int8"  # embedding / tied LM head format for every run (a quarter of SmolLM2's weights)
# Emulator (float32) against golden (float64). INT2 g128 leaves SmolLM2 so ill-conditioned that float32 rounding
# is amplified ~100x: two emulator runs differing only in BLAS summation order (1 vs 2 threads) disagree by
# 5.2e-4 relative on 24 tokens (INT4: 4.3e-6), so 1e-5 is out of reach of any float32 datapath there.
TOLERANCE = {"nf4": 1e-5, "int4": 1e-5, "int2": 2e-3}


@pytest.fixture(scope="module")
def text_ids() -> list[int]:
    return smollm2.english_token_ids(TEXT_TOKENS)


def ort_logits(path: Path, ids: list[int]) -> np.ndarray:
    sess = onnx_exports.ort_session(path)
    feeds = {"input_ids": np.asarray([ids], np.int64)}
    if any(i.name == "attention_mask" for i in sess.get_inputs()):
        feeds["attention_mask"] = np.ones((1, len(ids)), np.int64)
    return np.asarray(sess.run(["logits"], feeds)[0][0], np.float32)


@pytest.fixture(scope="module")
def fp32_logits(text_ids) -> dict:
    """onnxruntime on torch.onnx exports of the FP32 model: without the adapter, and with it merged."""
    return {None: ort_logits(onnx_exports.onnx_export("legacy"), text_ids),
            "lora": ort_logits(onnx_exports.onnx_export("legacy", adapter=True), text_ids)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compiled(source, fmt) -> artifact dir (each compiled once per module)."""
    root = tmp_path_factory.mktemp("real")
    done: dict = {}
    sources = {
        "hf": lambda: str(smollm2.hf_fp32()),
        "onnx": lambda: str(onnx_exports.onnx_export("legacy")),
        "gguf": lambda: str(smollm2.gguf_file()),
        "bnb": lambda: str(smollm2.bnb_checkpoint("nf4", True)),
        "bnb-after-inference": lambda: str(smollm2.bnb_checkpoint("nf4", True, after_inference=True)),
        "gptq": lambda: str(quantized_checkpoints.smollm2_gptq(4, 128)),
    }

    def get(source: str, fmt: str, **options) -> Path:
        key = (source, fmt, *sorted(options.items()))
        if key not in done:
            out = root / "-".join(map(str, (source, fmt, *options.values())))
            compile_checkpoint(sources[source](), out, [f"lora={smollm2.adapter()}"], TARGET,
                               CompileOptions(quant=fmt, quant_embedding=EMBEDDING, **options))
            done[key] = out
        return done[key]

    get.sources = sources
    return get


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_emulator_matches_golden(compiled, text_ids, fmt):
    out = compiled("hf", fmt)
    checks = verify(str(out), str(smollm2.hf_fp32()), [f"lora={smollm2.adapter()}"], steps=8,
                    prompt=text_ids[:24], with_onnx=False)
    assert [c.adapter for c in checks] == [None, "lora"]
    for c in checks:
        assert c.relative_error <= TOLERANCE[fmt], c
        assert c.tokens == c.golden_tokens, c


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_agreement_with_onnxruntime_fp32(compiled, text_ids, fp32_logits, fmt):
    out = compiled("hf", fmt)
    machine = Machine(out)
    manifest = machine.manifest
    model = source_model(manifest, str(smollm2.hf_fp32()), [f"lora={smollm2.adapter()}"])
    base = GoldenModel.of_artifacts(model, manifest)
    for adapter in (None, "lora"):
        machine.reset(adapter=adapter)
        emulated = machine.step(text_ids)
        golden = base.with_adapter(adapter).logits(text_ids)
        ref = fp32_logits[adapter]
        assert emulated.shape == ref.shape == (TEXT_TOKENS, model.config.vocab_size)
        agree, golden_agree = top1_agreement(ref, emulated), top1_agreement(ref, golden)
        assert abs(agree - golden_agree) <= 1 / TEXT_TOKENS, (adapter, agree, golden_agree)
        assert agree >= MIN_AGREEMENT[fmt], (adapter, agree)
        kl = float(kl_divergence(ref, emulated).mean())
        assert np.isfinite(kl) and kl == pytest.approx(float(kl_divergence(ref, golden).mean()), rel=1e-3, abs=1e-4)
        assert np.isfinite(_perplexity(emulated, np.asarray(text_ids)))


def test_fp32_reference_is_the_model(text_ids, fp32_logits):
    """The export really is SmolLM2: FP32 perplexity on English prose is that of a trained model, not noise."""
    ids = np.asarray(text_ids)
    assert _perplexity(fp32_logits[None], ids) < 40
    assert _perplexity(fp32_logits["lora"], ids) < 40
    assert top1_agreement(fp32_logits[None], fp32_logits["lora"]) > 0.8  # a small adapter moves it a little


@pytest.mark.parametrize("source", ["onnx", "gguf"])
def test_every_source_gives_the_same_images(compiled, source):
    """The HF checkpoint, its ONNX export and the GGUF it came from hold the same FP32 weights: same ROM."""
    a, b = compiled("hf", "int4"), compiled(source, "int4")
    files = sorted(p.relative_to(a) for p in (a / "rom").iterdir()) + [Path("program.bin")]
    files += sorted(p.relative_to(a) for p in (a / "sram").iterdir())
    assert len(files) > 3
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_gptq_checkpoint_keeps_its_codes(compiled):
    """A GPTQ int4 g128 checkpoint of SmolLM2 (its codes written in AutoGPTQ's v1 layout): the stored codes reach ROM
    untouched (576 = 4.5 groups: the last group of a row is 64 wide), and the golden model computes them exactly."""
    from romac.frontend import load_model
    from romac.frontend.qpack import AffineWeight

    out = compiled("gptq", "int4")
    model = load_model(compiled.sources["gptq"]())
    kept = [n for n, h in model.weights.items() if isinstance(h, AffineWeight)]
    assert len(kept) == 7 * 30 and all(model.weights[n].codec_spec == {"format": "int4", "group_size": 128} for n in kept)
    m = Machine(out)
    rid = m.manifest.region_ids()
    for name in kept[:7]:  # the ROM decodes to the checkpoint's exact values
        assert np.array_equal(m.rom.value(rid[name]), model.weights[name].load_exact())


def _rom_images(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((out / "rom").iterdir())}


def test_bnb_checkpoint_gives_the_nf4_images(compiled):
    a, b = compiled("hf", "nf4"), compiled("bnb", "nf4")
    assert _rom_images(a) == _rom_images(b)


def test_bnb_checkpoint_saved_after_inference(compiled):
    """A bnb checkpoint saved after a forward pass (bitsandbytes' CPU repacking re-nests its absmax on save) is
    reproduced from the FP checkpoint with --bnb-cpu-repacked; without it the double-quant statistics differ."""
    after = _rom_images(compiled("bnb-after-inference", "nf4"))
    assert _rom_images(compiled("hf", "nf4", bnb_cpu_repacked=True)) == after
    plain = _rom_images(compiled("hf", "nf4"))
    assert plain.keys() == after.keys() and any(plain[k] != after[k] for k in plain)


@pytest.mark.parametrize("source", ["onnx", "gguf", "bnb", "gptq"])
def test_other_sources_verify(compiled, text_ids, source):
    fmt = "nf4" if source == "bnb" else "int4"
    out = compiled(source, fmt)
    checks = verify(str(out), compiled.sources[source](), [f"lora={smollm2.adapter()}"], steps=6,
                    prompt=text_ids[:16], with_onnx=False)
    for c in checks:
        assert c.passed, c
    assert json.loads((out / "manifest.json").read_text())["model"]["num_layers"] == 30


def test_prompt_text_round_trip(compiled):
    """`romac run OUT --prompt` on the compiled real model continues English text (NF4, greedy)."""
    from click.testing import CliRunner

    from romac.cli import cli

    out = compiled("hf", "nf4")
    r = CliRunner().invoke(cli, ["run", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The capital of France is")
    assert len(r.output.strip()) > len("The capital of France is") + 3
