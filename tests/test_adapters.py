"""After tape-out: `romac adapter add/remove/list` on a compiled directory, the base fingerprint, `romac export-base`
and the round trip compile → export-base → train a LoRA with peft → adapter add → emulator == transformers + peft."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from romac import adapters as adapters_module
from romac.adapters import add_adapter, list_adapters, remove_adapter
from romac.artifacts import open_artifacts
from romac.driver import compile_checkpoint
from romac.emulator import Machine
from romac.errors import ArtifactError, CapacityError, RomacError
from romac.export import export_base
from romac.passes import CompileOptions
from romac.targets import load_target, target_from_dict
from tests.clirun import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hashes(out: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob(pattern)) if p.is_file()}


def _peft_adapter(base_dir: Path, out: Path, r: int = 8, seed: int = 3, modules=MODULES, base_name=None) -> Path:
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    if base_name is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    base, adapter = hf_checkpoint
    root = tmp_path_factory.mktemp("after")
    compile_checkpoint(str(base), root / "plain", [], options=CompileOptions(quant="int4"))
    compile_checkpoint(str(base), root / "with", [f"chat={adapter}"], options=CompileOptions(quant="int4"))
    return base, adapter, root


def test_add_gives_the_compiled_image_and_keeps_the_rom(setup, tmp_path):
    base, adapter, root = setup
    out = tmp_path / "out"
    shutil.copytree(root / "plain", out)
    before = {**_hashes(out, "rom/*"), **_hashes(out, "program.bin")}
    fingerprint = open_artifacts(out).base_fingerprint
    check = add_adapter(out, "chat", adapter)
    assert not check.known  # a hand-made adapter: its base cannot be told
    assert {**_hashes(out, "rom/*"), **_hashes(out, "program.bin")} == before
    assert _hashes(out, "sram/*") == _hashes(root / "with", "sram/*")
    m = open_artifacts(out)
    assert m.adapters == ("chat",) and m.base_fingerprint == fingerprint
    assert m.sram.to_json() == open_artifacts(root / "with").sram.to_json()
    assert [a["name"] for a in list_adapters(out)] == ["chat"]
    a = Machine(out, adapter="chat").step([1, 2, 3])
    b = Machine(root / "with", adapter="chat").step([1, 2, 3])
    assert np.array_equal(a, b)
    remove_adapter(out, "chat")
    assert open_artifacts(out).adapters == () and not (out / "sram" / "chat.bin").exists()
    assert {**_hashes(out, "rom/*"), **_hashes(out, "program.bin")} == before


def test_refusals_are_one_line_and_change_nothing(setup, tmp_path, capsys):
    base, adapter, root = setup
    out = tmp_path / "out"
    shutil.copytree(root / "with", out)
    snapshot = _hashes(out, "**/*")
    # a name already there
    res = run_main(capsys, "adapter", "add", out, f"chat={adapter}")
    assert res.returncode == 2 and "already holds an adapter named 'chat'" in res.stderr and "--force" in res.stderr
    # shapes of another model
    other = tmp_path / "other"
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    res = run_main(capsys, "adapter", "add", out, f"x={_peft_adapter(other, tmp_path / 'xa')}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "shape" in res.stderr
    # --strict and an adapter whose base cannot be told
    res = run_main(capsys, "adapter", "add", out, f"y={adapter}", "--strict")
    assert res.returncode == 2 and "cannot tell which base" in res.stderr
    # removing what is not there
    res = run_main(capsys, "adapter", "remove", out, "nope")
    assert res.returncode == 2 and "holds no adapter named 'nope'" in res.stderr
    assert _hashes(out, "**/*") == snapshot
    # a directory that fails its manifest check
    bank = sorted(out.glob("rom/*.rom"))[0]
    data = bytearray(bank.read_bytes())
    data[0] ^= 1
    bank.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        add_adapter(out, "z", adapter)


def test_an_adapter_too_big_for_the_sram_beside_the_kv_cache(hf_checkpoint, tmp_path):
    base, adapter = hf_checkpoint
    t = load_target("tiny")
    small = dataclasses.replace(t, sram_bytes=200_000)
    compile_checkpoint(str(base), tmp_path / "out", [], small, CompileOptions(quant="int4", max_context=64))
    big = _peft_adapter(base, tmp_path / "big", r=64)
    with pytest.raises(CapacityError, match=r"LoRA rank \d+ or less") as e:
        add_adapter(tmp_path / "out", "big", big)
    assert "\n" not in str(e.value)
    assert open_artifacts(tmp_path / "out").adapters == ()


def test_add_is_atomic_under_faults(setup, tmp_path, monkeypatch):
    """A failure at any step of writing the new directory leaves the old one whole (and no temporary)."""
    base, adapter, root = setup
    out = tmp_path / "out"
    shutil.copytree(root / "plain", out)
    snapshot = _hashes(out, "**/*")
    real_link = adapters_module.os.link
    calls = {"n": 0}

    def failing_link(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of linking the ROM images
        return real_link(src, dst)

    monkeypatch.setattr(adapters_module.os, "link", failing_link)
    with pytest.raises(KeyboardInterrupt):
        add_adapter(out, "chat", adapter)
    monkeypatch.undo()
    assert _hashes(out, "**/*") == snapshot and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    open_artifacts(out)


def test_add_survives_sigkill_at_any_moment(setup, tmp_path):
    """SIGKILL `romac adapter add` at many moments: the directory always opens, as the old or the new one."""
    base, adapter, root = setup
    out = tmp_path / "out"
    shutil.copytree(root / "plain", out)
    cmd = [sys.executable, "-m", "romac.cli", "adapter", "add", str(out), f"chat={adapter}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    whole = time.perf_counter() - start
    seen = set()
    for k in range(10):
        remove_adapter(out, "chat") if "chat" in open_artifacts(out).adapters else None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(whole * (0.5 + k / 10))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        m = open_artifacts(out)  # whole, old or new
        seen.add(m.adapters)
        assert m.adapters in ((), ("chat",))
    assert seen  # (which of the two each kill left depends on timing)
    add_adapter(out, "chat", adapter, force=True)  # and the next run cleans up after the killed ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_base_and_the_fingerprint_check(setup, tmp_path):
    base, adapter, root = setup
    export_base(root / "plain", tmp_path / "exp")
    info = json.loads((tmp_path / "exp" / "romac_base.json").read_text())
    assert info["base_fingerprint"] == open_artifacts(root / "plain").base_fingerprint
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exp", dtype=torch.float32)
    rom = Machine(root / "plain").rom
    rid = open_artifacts(root / "plain").region_ids()
    for name, p in model.named_parameters():  # every weight is exactly what the ROM decodes to
        ir = name.removeprefix("model.").removesuffix(".weight")
        assert np.array_equal(p.detach().numpy(), rom.value(rid[ir]).reshape(p.shape)), name
    good = _peft_adapter(tmp_path / "exp", tmp_path / "good", base_name=str(tmp_path / "exp"))
    out = tmp_path / "out"
    shutil.copytree(root / "plain", out)
    assert add_adapter(out, "good", good, strict=True).matches
    # the same adapter against another ROM (another format): refused
    compile_checkpoint(str(base), tmp_path / "int8", [], options=CompileOptions(quant="int8"))
    with pytest.raises(RomacError, match="exported from another ROM"):
        add_adapter(tmp_path / "int8", "good", good)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_round_trip_train_on_the_exported_base(hf_checkpoint, tmp_path, fmt):
    """compile → export-base → a few LoRA training steps with peft on the CPU → adapter add → the emulator computes
    what transformers + peft compute on the exported base (FP16 LoRA in SRAM: its rounding is the only difference)."""
    base, _ = hf_checkpoint
    target = dataclasses.replace(load_target("tiny"), lora="fp16")
    compile_checkpoint(str(base), tmp_path / "out", [], target, CompileOptions(quant=fmt))
    export_base(tmp_path / "out", tmp_path / "exp")
    exp = tmp_path / "exp"
    model = transformers.LlamaForCausalLM.from_pretrained(exp, dtype=torch.float32, device_map="cpu")
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    pm.train()
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "trained")
    assert add_adapter(tmp_path / "out", "trained", tmp_path / "trained", strict=True).matches
    prompt = [1, 17, 33, 60, 91, 5]
    emulated = Machine(tmp_path / "out", adapter="trained").step(prompt)
    if fmt == "nf4":  # bitsandbytes' CPU forward is not exact (FACTS §8): compare with its dequantized weights
        import bitsandbytes as bnb

        from tests.bnb_reference import reference_dequantize

        float_model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        exported = transformers.LlamaForCausalLM.from_pretrained(exp, dtype=torch.float32, device_map="cpu")
        quant = dict(exported.named_modules())
        rom = Machine(tmp_path / "out").rom
        rid = open_artifacts(tmp_path / "out").region_ids()
        replaced = 0
        with torch.no_grad():
            for name, mod in float_model.named_modules():
                if isinstance(quant.get(name), bnb.nn.Linear4bit):
                    w = reference_dequantize(quant[name].weight.data, quant[name].weight.quant_state)
                    assert np.array_equal(w, rom.value(rid[name.removeprefix("model.")])), name  # the ROM's codes
                    mod.weight.copy_(torch.from_numpy(w))
                    replaced += 1
            floats = dict(float_model.named_parameters())
            for name, p in exported.named_parameters():  # embedding, norms, head: the ROM's values, as exported
                if p.dtype == torch.float32 and name in floats:
                    floats[name].copy_(p)
        assert replaced == 7 * float_model.config.num_hidden_layers
        reference = peft.PeftModel.from_pretrained(float_model, tmp_path / "trained").eval()
    else:
        reference = peft.PeftModel.from_pretrained(
            transformers.LlamaForCausalLM.from_pretrained(exp, dtype=torch.float32), tmp_path / "trained").eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits[0].numpy()
    err = np.abs(emulated - expected).max() / np.abs(expected).max()
    assert err < 2e-3, err  # FP16 A and B: 2^-11 relative per weight
    assert (emulated.argmax(-1) == expected.argmax(-1)).all()


def test_cli(setup, tmp_path, capsys):
    base, adapter, root = setup
    out = tmp_path / "out"
    shutil.copytree(root / "plain", out)
    res = run_main(capsys, "adapter", "add", out, f"chat={adapter}")
    assert res.returncode == 0 and "added adapter 'chat'" in res.stdout and "warning: cannot tell" in res.stderr
    res = run_main(capsys, "adapter", "list", out, "--json")
    assert json.loads(res.stdout)[0]["name"] == "chat"
    res = run_main(capsys, "export-base", out, tmp_path / "exp")
    assert res.returncode == 0 and (tmp_path / "exp" / "romac_base.json").is_file()
    res = run_main(capsys, "export-base", out, tmp_path / "exp")
    assert res.returncode == 2 and "already exists" in res.stderr
    assert run_main(capsys, "export-base", out, tmp_path / "exp", "--force").returncode == 0
    assert run_main(capsys, "adapter", "remove", out, "chat").returncode == 0
