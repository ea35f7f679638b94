"""The checkpoint's tokenizer, as a ``tokenizers`` ``tokenizer.json``, so ``romac run --prompt "text"`` works.

Sources:

- a Hugging Face checkpoint directory's ``tokenizer.json`` (:func:`from_hf_dir`), carried byte for byte: its
  post-processor decides BOS/EOS, as for transformers' ``AutoTokenizer`` (which, for a ``TokenizersBackend``
  folder, ignores ``tokenizer_config.json``'s ``add_bos_token``);
- a GGUF file's ``tokenizer.ggml.*`` metadata (:func:`from_gguf_metadata`), rebuilt the way llama.cpp tokenizes:

  - ``gpt2`` (byte-level BPE): ``tokens`` + ``merges``, with the pre-tokenizer that ``tokenizer.ggml.pre``
    names (:data:`GGUF_PRE_TOKENIZERS`; e.g. ``smollm`` splits every digit before GPT-2's regex, as llama.cpp and
    SmolLM's own ``tokenizer.json`` do, ``llama-bpe`` uses LLaMA-3's regex);
  - ``llama`` (SentencePiece as BPE with byte fallback): merges recovered from the token scores exactly as
    transformers' ``generate_merges`` does, ``▁`` for spaces, a leading one per ``add_space_prefix``.

  Control tokens become special tokens (never split); ``add_bos_token``/``add_eos_token`` become the
  post-processor (defaults: on for ``llama``, off for ``gpt2``, as llama.cpp). Anything else raises
  :class:`TokenizerUnavailable`: the model still compiles, and ``--prompt-ids`` still works.

The result travels as ``tokenizer.json`` text in :attr:`romac.ir.Model.tokenizer`; the emitter writes it into
the artifact directory (:data:`romac.artifacts.TOKENIZER`), and :func:`artifact_tokenizer` reads it back.
Encoding adds BOS/EOS through that post-processor (``add_special_tokens=True``), so the rule lives in one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from romac.errors import RomacError
from romac.spec.manifest import TOKENIZER, Manifest

__all__ = [
    "TokenizerUnavailable",
    "GGUF_PRE_TOKENIZERS",
    "from_hf_dir",
    "from_gguf_metadata",
    "artifact_tokenizer",
    "encode",
    "decode",
]


class TokenizerUnavailable(RomacError):
    """The input describes a tokenizer romac cannot rebuild (the model itself is fine)."""


# Pre-tokenizer regexes, from llama.cpp's llama-vocab.cpp (and transformers' GGUF mapping, which agrees).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: tokenizer.ggml.pre values romac rebuilds for byte-level BPE, by the pre-tokenization llama.cpp applies.
GGUF_PRE_TOKENIZERS = {
    # GPT-2's regex alone
    "gpt2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    # every digit on its own, then GPT-2's regex
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "exaone": "digits+gpt2",
    "minerva-7b": "digits+gpt2",
    # LLaMA 3's regex
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "dbrx": "llama3",
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's LLAMA_TOKEN_TYPE_*)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells tokens in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tk():
    try:
        import tokenizers
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise TokenizerUnavailable(f"the 'tokenizers' package is not importable ({e})") from None
    return tokenizers


def _template(tok, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Set the post-processor that adds BOS and/or EOS (transformers' ``update_post_processor``)."""
    from tokenizers import processors

    single = f"{(bos[0] + ':0 ') if bos else ''}$A:0{(' ' + eos[0] + ':0') if eos else ''}"
    pair = f"{single}{(' ' + bos[0] + ':1') if bos else ''} $B:1{(' ' + eos[0] + ':1') if eos else ''}"
    specials = [t for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# -- Hugging Face directories ----------------------------------------------------------------------------------


def from_hf_dir(root: str | Path) -> tuple[str, str] | None:
    """(tokenizer.json text, description) of a checkpoint directory, or None when it has no tokenizer.json."""
    root = Path(root)
    path = root / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizers = _tk()
    try:
        text = path.read_text(encoding="utf-8")
        tokenizers.Tokenizer.from_str(text)  # parse it now: a broken file is the checkpoint's error, not run's
    except (OSError, UnicodeDecodeError, Exception) as e:  # tokenizers raises its own Exception type
        raise RomacError(f"not a tokenizers tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         where=str(path)) from None
    return text, "tokenizer.json of the checkpoint"


# -- GGUF metadata -----------------------------------------------------------------------------------------------


def _meta_list(meta: Mapping[str, Any], key: str, where: str) -> list:
    v = meta.get(key)
    if v is None:
        return []
    if isinstance(v, np.ndarray):
        return v.tolist()
    if not isinstance(v, list):
        raise TokenizerUnavailable(f"metadata key {key!r} is not an array", where=where)
    return v


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key)
    return v if isinstance(v, bool) else default


def _merge_pairs(merges: Sequence[str], where: str) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else ()
        if len(parts) != 2:
            raise TokenizerUnavailable(f"merge {m!r} in 'tokenizer.ggml.merges' is not two tokens", where=where)
        pairs.append((parts[0], parts[1]))
    return pairs


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece merges from the vocabulary and scores, exactly as transformers' ``generate_merges``."""
    merges = []
    for merge, score in scores.items():
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge)) if merge[:i] in vocab and merge[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def from_gguf_metadata(meta: Mapping[str, Any], where: str = "GGUF") -> tuple[str, str]:
    """(tokenizer.json text, description) rebuilt from GGUF ``tokenizer.ggml.*`` metadata.

    Raises :class:`TokenizerUnavailable` (naming the field) for a tokenizer romac does not rebuild.
    """
    tokenizers = _tk()
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = _meta_list(meta, "tokenizer.ggml.tokens", where)
    if kind is None or not tokens:
        raise TokenizerUnavailable("the file has no tokenizer ('tokenizer.ggml.model' / 'tokenizer.ggml.tokens')",
                                   where=where)
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerUnavailable("'tokenizer.ggml.tokens' is not an array of strings", where=where)
    types = _meta_list(meta, "tokenizer.ggml.token_type", where) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerUnavailable(f"'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens",
                                   where=where)

    def token_id(key: str) -> int | None:
        v = meta.get(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens) else None

    pre = meta.get("tokenizer.ggml.pre")
    if kind == "gpt2":
        style = GGUF_PRE_TOKENIZERS.get(pre)
        if style is None:
            raise TokenizerUnavailable(
                f"metadata 'tokenizer.ggml.pre' is {pre!r}, a pre-tokenizer romac does not rebuild",
                where=where,
                hint=f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}",
            )
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = _merge_pairs(_meta_list(meta, "tokenizer.ggml.merges", where), where)
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
        if style == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        elif style == "digits+gpt2":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        specials_ok = alphabet  # a control token spelled outside the byte alphabet is a mislabel: skip it
        add_bos_default = False
        desc = f"GGUF metadata (byte-level BPE, pre-tokenizer {pre})"
    elif kind == "llama":
        scores = _meta_list(meta, "tokenizer.ggml.scores", where)
        if len(scores) != len(tokens):
            raise TokenizerUnavailable(f"'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens",
                                       where=where)
        vocab = {t: i for i, t in enumerate(tokens)}
        if "tokenizer.ggml.merges" in meta:
            merges = _merge_pairs(_meta_list(meta, "tokenizer.ggml.merges", where), where)
        else:
            merges = _generate_merges(vocab, dict(zip(tokens, (float(s) for s in scores))))
        unk = token_id("tokenizer.ggml.unknown_token_id")
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
                                              unk_token=tokens[unk] if unk is not None else None))
        prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
        scheme = "first" if prefix else "never"
        try:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        except TypeError:  # tokenizers < 0.19 has no `split` (and splits on "▁": the same except for merges across it)
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        specials_ok = None
        add_bos_default = True
        desc = "GGUF metadata (SentencePiece BPE)"
    else:
        raise TokenizerUnavailable(
            f"metadata 'tokenizer.ggml.model' is {kind!r}, a tokenizer romac does not rebuild",
            where=where,
            hint="supported: gpt2 (byte-level BPE), llama (SentencePiece)",
        )

    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (specials_ok is None or set(t) <= specials_ok)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False) and eos is not None
    _template(tok, (tokens[bos], bos) if add_bos else None, (tokens[eos], eos) if add_eos else None)
    return tok.to_str(), desc


# -- artifacts ---------------------------------------------------------------------------------------------------


def artifact_tokenizer(manifest: Manifest):
    """The tokenizers.Tokenizer of an (opened, checked) artifact directory; a one-line error if it has none."""
    root = Path(manifest.root)
    if TOKENIZER not in manifest.files:
        why = (manifest.source or {}).get("tokenizer")
        reason = why.removeprefix("unavailable: ") if isinstance(why, str) and why.startswith("unavailable") else (
            "the checkpoint it was compiled from carried no tokenizer")
        raise RomacError(
            f"these artifacts hold no {TOKENIZER}, so text prompts are unavailable ({reason})",
            where=str(root),
            hint="give token ids with --prompt-ids instead",
        )
    tokenizers = _tk()
    try:
        return tokenizers.Tokenizer.from_file(str(root / TOKENIZER))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
        raise RomacError(f"cannot read the tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         where=str(root / TOKENIZER)) from None


def model_tokenizer(text: str | None):
    """The tokenizers.Tokenizer of a model's ``tokenizer.json`` text (``Model.tokenizer``), or None without one."""
    return None if text is None else _tk().Tokenizer.from_str(text)


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text``, with BOS/EOS as the tokenizer's post-processor adds them."""
    return list(tok.encode(text, add_special_tokens=True).ids)


def decode(tok, ids: Sequence[int]) -> str:
    """Text of token ids (special tokens such as BOS left out)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
