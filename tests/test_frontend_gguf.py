"""GGUF front-end and tokenizers: small GGUF files written with gguf.GGUFWriter the way llama.cpp's converter
writes them (q/k rows permuted, tensors quantized with gguf.quants), checked against gguf's own reader and
dequantizers (bit-exact) and against transformers' GGUF loader (logits, token ids); then the real model,
SmolLM2-135M-Instruct's Q4_1 GGUF, against the HF fp32 export of the same file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from romac.errors import RomacError  # noqa: E402
from romac.frontend import describe, detect, load_model  # noqa: E402
from romac.frontend.gguf import GGUFFile, load_gguf, unpermute_rows  # noqa: E402
from romac.frontend.tokenizer import TokenizerUnavailable, from_gguf_metadata, from_hf_dir  # noqa: E402
from romac.ir import ROPE_TABLE, tensor_names  # noqa: E402
from romac.reference import GoldenModel, relative_error  # noqa: E402
from tests.clirun import assert_one_line_error, run_main  # noqa: E402
from tests.fixtures import smollm2  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # multiples of 256: the K-quants' block
LAYER_NAMES = {  # GGUF short name -> HF module path
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
SENTENCES = [
    "The capital of France is",
    "Hello, world! How are you today?",
    "  two leading spaces,   three inside, and a trailing one ",
    "Digits 7 and 42 and 2024; pi is 3.14159, e is 2.718.",
    "Unicode: café, naïve, Straße, 東京, Ελληνικά, emoji 🙂 and an em—dash “in quotes”.",
    "Tabs\tand\nnew lines\n\n  indented.",
    "don't won't it's I'm we'll they'd",
]

# The variants written: tensor role -> type. "proj" is the seven projections, "embed"/"head" the embedding and
# LM head; norms are always F32 (as llama.cpp writes them).
VARIANTS = {
    "F32": dict(proj=Q.F32, embed=Q.F32, head=Q.F32),
    "F16": dict(proj=Q.F16, embed=Q.F16, head=Q.F16),
    "BF16": dict(proj=Q.BF16, embed=Q.BF16, head=Q.F32),
    "Q8_0": dict(proj=Q.Q8_0, embed=Q.Q8_0, head=Q.Q8_0),
    "Q4_0": dict(proj=Q.Q4_0, embed=Q.Q8_0, head=Q.Q4_0),
    "Q4_1": dict(proj=Q.Q4_1, embed=Q.Q8_0, head=None),  # tied, like SmolLM2's file
    "Q5_0": dict(proj=Q.Q5_0, embed=Q.Q5_1, head=Q.Q5_0),
    # K-quants: gguf.quants cannot quantize them, so their blocks are random bytes with sane fp16 scales
    "K": dict(proj={"attn_q": Q.Q4_K, "attn_k": Q.Q3_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K,
                    "ffn_gate": Q.Q2_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}, embed=Q.Q6_K, head=Q.Q5_K),
}
TRANSFORMERS_READS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "K")  # transformers has no Q5_0/Q5_1

# byte offsets of the fp16 super-block scales (d, dmin) in each K-quant block, and a scale giving weights ~0.05
_K_SCALES = {Q.Q2_K: ((80, 82), 1e-3), Q.Q3_K: ((108,), 3e-4), Q.Q4_K: ((0, 2), 5e-5), Q.Q5_K: ((0, 2), 3e-5),
             Q.Q6_K: ((208,), 1e-5)}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (HF -> GGUF row order of q and k)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offsets, base = _K_SCALES[qtype]
    for k, off in enumerate(offsets):
        d = (rng.uniform(0.5, 1.5, raw.shape[:2]) * base * (1.0 if k == 0 else 0.5)).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def train_tokenizer(vocab_size: int = 400) -> tuple[list[str], list[str]]:
    """A small byte-level BPE (GPT-2 style) trained on real English: (tokens, merges) as GGUF stores them."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([smollm2.english_text(3000), "2024 1999 12345 3.14159"], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [""] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges


def add_gpt2_tokenizer(w, tokens, merges, pre="gpt2", add_bos=False) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)


def write_gguf(path: Path, state: dict[str, np.ndarray], types: dict, tok, *, arch: str = "llama", rng=None,
               drop: tuple[str, ...] = (), override: dict | None = None, meta: dict | None = None,
               skip_meta: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """Write the HF ``state`` (numpy, float32) as llama.cpp's converter would, with the tensor types given."""
    rng = rng or np.random.default_rng(0)
    override = override or {}
    w = gguf.GGUFWriter(str(path), arch)
    vocab = state["model.embed_tokens.weight"].shape[0]
    fields = {
        "block_count": LAYERS, "context_length": 512, "embedding_length": HIDDEN, "feed_forward_length": FFN,
        "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.dimension_count": HIDDEN // HEADS,
        "vocab_size": vocab,
    }
    fields.update(meta or {})
    for k, v in fields.items():
        if k not in skip_meta:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_file_type(0)
    if tok is not None:
        add_gpt2_tokenizer(w, *tok)

    def put(name: str, arr: np.ndarray, qtype) -> None:
        if name in drop:
            return
        if name in override:
            w.add_tensor(name, override[name])
            return
        arr = np.ascontiguousarray(arr, np.float32)
        if qtype == Q.F32 or arr.ndim == 1:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif qtype in _K_SCALES:
            w.add_tensor(name, random_k_blocks(*arr.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    put("token_embd.weight", state["model.embed_tokens.weight"], types["embed"])
    put("output_norm.weight", state["model.norm.weight"], Q.F32)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    if types["head"] is not None:
        put("output.weight", state["lm_head.weight"], types["head"])
    for i in range(LAYERS):
        for short, module in LAYER_NAMES.items():
            a = state[f"model.layers.{i}.{module}.weight"]
            if short == "attn_q":
                a = permute(a, HEADS)
            elif short == "attn_k":
                a = permute(a, KV_HEADS)
            proj = types["proj"]
            put(f"blk.{i}.{short}.weight", a, proj.get(short, Q.F32) if isinstance(proj, dict) else proj)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def torch_llama(vocab: int, seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-like scales (default init gives near-uniform logits), informative norms
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.0 / p.shape[1] ** 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: gguf path}, plus "_tok" (tokens, merges), "_state" (HF state as numpy), "_hf" (HF dir)."""
    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer()
    model = torch_llama(len(tok[0]))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out: dict = {"_tok": tok, "_state": state, "_root": root}
    for k, (name, types) in enumerate(VARIANTS.items()):
        d = root / name
        d.mkdir()
        out[name] = write_gguf(d / "model.gguf", state, types, tok, rng=np.random.default_rng(k))
    hf = root / "hf"
    model.save_pretrained(hf)
    out["_hf"] = hf
    return out


def reference_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF through gguf's own reader and dequantizers, q/k put back in HF order (FACTS §3)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name or ".attn_k." in t.name:
            nh = HEADS if ".attn_q." in t.name else KV_HEADS
            rows, cols = w.shape
            w = w.reshape(nh, rows // nh // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        out[t.name] = w
    return out


def _gguf_name(name: str) -> str:
    fixed = {"embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, rest = name.split(".", 2)
    short = next(s for s, m in LAYER_NAMES.items() if m == rest)
    return f"blk.{layer}.{short}.weight"


# -- weights -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_bit_exact_with_gguf_dequantize(tiny, variant):
    model = load_gguf(tiny[variant])
    ref = reference_weights(tiny[variant])
    assert model.config.tie_word_embeddings == (VARIANTS[variant]["head"] is None)
    rng = np.random.default_rng(1)
    for name in tensor_names(model.config):
        handle = model.weights[name]
        got = handle.load()
        assert got.dtype == np.float32 and got.shape == handle.shape
        np.testing.assert_array_equal(got, ref[_gguf_name(name)], err_msg=name)
        if got.ndim == 2:  # the row loader (what the emitter streams) gives the same rows
            for a, b in [(0, 1), (0, got.shape[0]), *sorted(tuple(sorted(rng.integers(0, got.shape[0] + 1, 2))) for _ in range(3))]:
                np.testing.assert_array_equal(handle.load_rows(a, b), got[a:b], err_msg=f"{name} rows {a}:{b}")
    if variant == "F32":  # q/k un-permuted in the right direction: exactly the original HF matrices
        for key, arr in tiny["_state"].items():
            name = "lm_head" if key == "lm_head.weight" else key.removeprefix("model.").removesuffix(".weight")
            np.testing.assert_array_equal(model.weights[name].load(), arr, err_msg=key)
    elif variant != "K":  # quantized copies of the same matrices
        for i in range(LAYERS):
            q = model.weights[f"layers.{i}.self_attn.q_proj"].load()
            orig = tiny["_state"][f"model.layers.{i}.self_attn.q_proj.weight"]
            assert np.corrcoef(q.ravel(), orig.ravel())[0, 1] > 0.98


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, head_dim, cols in [(4, 64, 32), (9, 64, 16), (3, 4, 5)]:
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(permute(w, heads), heads), w)
        assert not np.array_equal(permute(w, heads), w)


def _transformers_logits(path: Path, ids: list[int]) -> np.ndarray:
    m = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("variant", TRANSFORMERS_READS)
def test_golden_logits_match_transformers_gguf_loader(tiny, variant):
    model = load_gguf(tiny[variant])
    ids = [1, 17, 250, 3, 399, 42, 7, 100, 5, 311, 64]
    golden = GoldenModel(model, {n: {"format": "fp32"} for n in model.weights})
    ours = golden.logits(ids)
    ref = _transformers_logits(tiny[variant], ids)
    assert ref.shape == ours.shape
    assert relative_error(ours, ref) < 1e-4
    assert np.std(ref) > 0.1  # informative logits, not a degenerate model


def test_compile_verify_and_prompt(tiny, tmp_path, capsys):
    path = tiny["Q4_1"]
    out = tmp_path / "out"
    res = run_main(capsys, "compile", path, "--quant", "int4", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "architecture 'llama'" in res.stderr and "Q4_1" in res.stderr and "2 layers" in res.stderr
    assert "--prompt" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"] and manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["path"] == "model.gguf"
    res = run_main(capsys, "verify", out, "--model", path, "--no-onnx", "--steps", "8", "--json")
    assert res.returncode == 0, res.stderr
    assert all(c["passed"] for c in json.loads(res.stdout))
    res = run_main(capsys, "run", out, "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is") and len(res.stdout.strip()) > len("The capital of France is")
    ids = run_main(capsys, "run", out, "--prompt-ids", "1,5,9", "--max-new-tokens", "3").stdout.strip()
    assert len(ids.split(",")) == 3 and all(t.isdigit() for t in ids.split(","))
    assert_one_line_error(run_main(capsys, "run", out, "--prompt", "x", "--prompt-ids", "1"), "--prompt", "--prompt-ids")
    # the tokenizer is sha-checked like every file
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace("Ġ", "G", 1))
    assert_one_line_error(run_main(capsys, "run", out, "--prompt", "The capital", "--max-new-tokens", "1"),
                          "tokenizer.json")


def test_gguf_and_hf_checkpoint_of_the_same_weights_compile_to_the_same_rom(tiny, tmp_path):
    from romac.driver import compile_checkpoint
    from romac.passes import CompileOptions

    a, b = tmp_path / "gguf", tmp_path / "hf"
    compile_checkpoint(str(tiny["F32"]), a, options=CompileOptions(quant="int4"))
    compile_checkpoint(str(tiny["_hf"]), b, options=CompileOptions(quant="int4"))
    roms = sorted(p.relative_to(a) for p in (a / "rom").iterdir())
    assert roms and all((a / r).read_bytes() == (b / r).read_bytes() for r in roms)
    assert (a / "program.bin").read_bytes() == (b / "program.bin").read_bytes()


def test_detect_by_magic_and_describe(tiny, tmp_path):
    renamed = tmp_path / "weights.bin"
    shutil.copy(tiny["Q4_0"], renamed)
    assert detect(str(tiny["Q4_0"])) == "gguf" and detect(str(renamed)) == "gguf"
    text = describe(str(renamed))
    assert "llama" in text and "2 layers" in text and "Q4_0" in text and "F32" in text
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(RomacError, match="GGUF magic"):
        detect(str(fake))
    assert load_model(str(renamed)).source["kind"] == "gguf"


def test_rope_freqs_tensor_is_folded_into_the_rope_table(tiny, tmp_path):
    factors = np.linspace(1.0, 8.0, HIDDEN // HEADS // 2).astype(np.float32)  # LLaMA-3 style, as llama.cpp stores it
    path = write_gguf(tmp_path / "r.gguf", tiny["_state"], VARIANTS["F32"], tiny["_tok"],
                      extra={"rope_freqs.weight": factors})
    model = load_gguf(path)
    np.testing.assert_allclose(model.weights[ROPE_TABLE].load(), model.config.rope_inv_freq() / factors, rtol=1e-6)
    assert model.source["rope_freqs"] is True and "rope_freqs.weight" not in model.source["ignored_tensors"]


# -- errors --------------------------------------------------------------------------------------------------


def _err(path, capsys, *words):
    return assert_one_line_error(run_main(capsys, "compile", path, "-q", "--out", Path(path).parent / "out"),
                                 str(path), *words)


def test_error_other_architecture(tiny, tmp_path, capsys):
    path = write_gguf(tmp_path / "qwen.gguf", tiny["_state"], VARIANTS["F32"], tiny["_tok"], arch="qwen2")
    _err(path, capsys, "general.architecture", "qwen2", "llama")
    assert not (tmp_path / "out").exists()


def test_error_unsupported_tensor_type(tiny, tmp_path, capsys):
    bad = tiny["_state"]["model.layers.1.mlp.up_proj.weight"].astype(np.float64)
    path = write_gguf(tmp_path / "f64.gguf", tiny["_state"], VARIANTS["F32"], tiny["_tok"],
                      override={"blk.1.ffn_up.weight": bad})
    _err(path, capsys, "blk.1.ffn_up.weight", "F64", "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")


def test_error_missing_tensor(tiny, tmp_path, capsys):
    path = write_gguf(tmp_path / "missing.gguf", tiny["_state"], VARIANTS["Q8_0"], tiny["_tok"],
                      drop=("blk.1.ffn_up.weight",))
    _err(path, capsys, "blk.1.ffn_up.weight", "missing")


def test_error_missing_metadata_and_wrong_shape(tiny, tmp_path, capsys):
    path = write_gguf(tmp_path / "nometa.gguf", tiny["_state"], VARIANTS["F32"], tiny["_tok"],
                      skip_meta=("block_count",))
    _err(path, capsys, "llama.block_count", "missing")
    path = write_gguf(tmp_path / "shape.gguf", tiny["_state"], VARIANTS["F32"], tiny["_tok"],
                      meta={"feed_forward_length": FFN * 2})
    _err(path, capsys, "blk.0.ffn_gate.weight", "shape", "metadata")


@pytest.mark.parametrize("cut", ["header", "tokens", "data"])
def test_error_truncated_file(tiny, tmp_path, capsys, cut):
    src = tiny["Q4_1"].read_bytes()
    f = GGUFFile(tiny["Q4_1"])
    last = max(f.tensors.values(), key=lambda t: t.end)
    size = {"header": 20, "tokens": 2000, "data": last.end - 7}[cut]
    path = tmp_path / f"cut-{cut}.gguf"
    path.write_bytes(src[:size])
    line = _err(path, capsys, "truncated")
    if cut == "data":
        assert last.name in line
    if cut == "tokens":
        assert "tokenizer.ggml.tokens" in line


# -- tokenizers ----------------------------------------------------------------------------------------------


def _tokenizer_gguf(path: Path, write) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ours(path: Path):
    text, _ = from_gguf_metadata(GGUFFile(path).metadata, where=str(path))
    return tokenizers.Tokenizer.from_str(text)


def _theirs(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _pieces_cross_digits(tok, text: str) -> bool:
    enc = tok.encode(text)
    return any(sum(ch.isdigit() for ch in text[a:b]) > 1 for a, b in enc.offsets)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "smollm"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_byte_level_tokenizer_matches_transformers(tiny, tmp_path, pre, add_bos):
    tokens, merges = tiny["_tok"]
    path = _tokenizer_gguf(tmp_path / "tok.gguf", lambda w: add_gpt2_tokenizer(w, tokens, merges, pre, add_bos))
    ours, theirs = _ours(path), _theirs(path)
    for s in SENTENCES + ["<|im_start|>user\nHi there<|im_end|>"]:
        a, b = ours.encode(s).ids, theirs(s)["input_ids"]
        if pre == "smollm" and any(ch.isdigit() for ch in s):
            # llama.cpp (and SmolLM's own tokenizer.json) split every digit before GPT-2's regex; transformers'
            # GGUF converter does not know "smollm" and keeps runs of digits together. We follow llama.cpp.
            assert not _pieces_cross_digits(ours, s)
            continue
        assert a == b, s
        assert ours.decode(a[1:] if add_bos else a, skip_special_tokens=False) == s
    assert (ours.encode("Hello").ids[0] == 1) == add_bos
    assert ours.encode("<|im_end|>").ids[-1] == 2  # control tokens stay whole


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary (unk, bos, eos, 256 byte tokens, pieces with ▁), as GGUF holds one."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([smollm2.english_text(3000)], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    seen = set(tokens)
    for p, _ in pieces:
        if p not in seen:
            tokens.append(p)
            types.append(1)
            seen.add(p)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, space_prefix):
    tokens, scores, types = _sentencepiece_vocab()

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(space_prefix)

    path = _tokenizer_gguf(tmp_path / "spm.gguf", write)
    ours, theirs = _ours(path), _theirs(path)
    for s in SENTENCES:
        a = ours.encode(s).ids
        assert a[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
        if space_prefix:
            assert a == theirs(s)["input_ids"], s
            assert ours.decode(a) == theirs.decode(a, skip_special_tokens=True) == s.strip(" ") or s.startswith(" "), s
        else:
            # llama.cpp prepends no "▁" when add_space_prefix is false; transformers' GGUF converter ignores the
            # flag and always prepends one. They agree on text that starts with a space.
            if not s.startswith(" "):
                assert ours.encode(s).tokens[1][0] != "▁"
            assert ours.encode(" " + s).ids == theirs(" " + s)["input_ids"], s


def test_unsupported_tokenizer_still_compiles_and_says_why(tiny, tmp_path, capsys):
    tokens, merges = tiny["_tok"]
    path = write_gguf(tmp_path / "m.gguf", tiny["_state"], VARIANTS["Q8_0"], None)
    # no tokenizer at all
    model = load_gguf(path)
    assert model.tokenizer is None and model.source["tokenizer"].startswith("unavailable")
    out = tmp_path / "out"
    assert run_main(capsys, "compile", path, "-q", "--out", out).returncode == 0
    line = assert_one_line_error(run_main(capsys, "run", out, "--prompt", "hi"), "text prompts are unavailable",
                                 "--prompt-ids")
    assert "no tokenizer" in line
    # a pre-tokenizer romac does not know
    with pytest.raises(TokenizerUnavailable, match="tokenizer.ggml.pre.*'qwen2'"):
        from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}, where="x.gguf")
    with pytest.raises(TokenizerUnavailable, match="'rwkv'"):
        from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": tokens}, where="x.gguf")


def test_prompt_on_artifacts_without_tokenizer(compile_small, capsys):
    from tests.conftest import small_config, small_model

    out = compile_small(small_model(small_config()))
    line = assert_one_line_error(run_main(capsys, "run", out, "--prompt", "hello"), "tokenizer.json", "--prompt-ids")
    assert "text prompts are unavailable" in line


def test_hf_checkpoint_tokenizer_is_carried(tiny, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(tiny["_hf"], hf)
    _theirs(tiny["Q8_0"]).save_pretrained(hf)
    text, _ = from_hf_dir(hf)
    assert text == (hf / "tokenizer.json").read_text()  # carried as written
    ours, ref = tokenizers.Tokenizer.from_str(text), transformers.AutoTokenizer.from_pretrained(hf)
    for s in SENTENCES:
        assert ours.encode(s).ids == ref(s)["input_ids"], s
    out = tmp_path / "out"
    assert run_main(capsys, "compile", hf, "-q", "--out", out).returncode == 0
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    res = run_main(capsys, "run", out, "--prompt", "Hello there", "--max-new-tokens", "3")
    assert res.returncode == 0 and res.stdout.startswith("Hello there"), res.stderr

    # BOS is the post-processor's business: one that adds it is followed (so is transformers)
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["post_processor"] = json.loads(tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)]).__getstate__())
    (hf / "tokenizer.json").write_text(json.dumps(tj))
    ours = tokenizers.Tokenizer.from_str(from_hf_dir(hf)[0])
    ref = transformers.AutoTokenizer.from_pretrained(hf)
    for s in SENTENCES:
        assert ours.encode(s).ids == ref(s)["input_ids"], s
    assert ours.encode("Hello").ids[0] == 1


# -- the real model: SmolLM2-135M-Instruct Q4_1 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_gguf():
    return smollm2.gguf_file()


@pytest.mark.slow
def test_smollm2_weights_match_transformers_fp32_export(smol_gguf):
    t0 = time.perf_counter()
    model = load_gguf(smol_gguf)
    ours = {name: h.load() for name, h in model.weights.items()}
    elapsed = time.perf_counter() - t0
    assert model.source["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    hf = load_model(str(smollm2.hf_fp32()))
    assert hf.config == model.config
    for name, handle in hf.weights.items():
        ref = handle.load()
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6, atol=0, err_msg=name)
    assert elapsed < 30, f"loading every tensor took {elapsed:.1f} s"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol_gguf):
    ours = _ours(smol_gguf)
    # transformers' own conversion of this file's tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)),
    # as the fixture saved it: the same tokenizer.json, without its 10 s of reconversion
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2.hf_fp32())
    for s in SENTENCES + ["<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n"]:
        a = ours.encode(s).ids
        assert a == theirs(s)["input_ids"], s
        assert ours.decode(a, skip_special_tokens=False) == s


@pytest.mark.slow
def test_smollm2_int4_prompt(smol_gguf, tmp_path, capsys):
    out = tmp_path / "smol"
    target = Path(__file__).resolve().parent.parent / "benchmarks" / "targets" / "bench-1g.toml"
    res = run_main(capsys, "compile", smol_gguf, "--target", target, "--quant", "int4", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "30 layers" in res.stderr and "Q4_1" in res.stderr
    prompt = "The capital of France is"
    res = run_main(capsys, "run", out, "--prompt", prompt, "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    text = res.stdout.strip()
    assert text.startswith(prompt) and len(text) > len(prompt) + 3
    assert "Paris" in text
