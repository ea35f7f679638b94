"""The IR: a LLaMA-family decoder as a small graph of ops over lazily loaded weights.

A :class:`Model` is immutable: passes return a new one (``dataclasses.replace``) and never mutate their input.
Its ``graph`` is a networkx DiGraph whose nodes are ops (:class:`Op`), in data-flow order; its ``weights``
map canonical tensor names (HF names without the ``model.`` prefix and ``.weight`` suffix, e.g.
``layers.0.self_attn.q_proj``) to :class:`WeightHandle` objects that read the tensor only when asked.
Nothing in the IR holds weight arrays, so a 8B model's IR is a few kilobytes.

Passes add their results to the model's :class:`romac.spec.plan.Plan` (formats and tile grids per tensor, region
placement, SRAM map, program), a typed record each pass fills in part.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import networkx as nx
import numpy as np

from romac.errors import RomacError
from romac.spec.plan import Plan

__all__ = [
    "ATTN_PROJECTIONS", "MLP_PROJECTIONS", "PROJECTIONS", "ROPE_TABLE", "EMBEDDING_TENSORS", "projection_tensor",
    "OpKind", "ModelConfig", "WeightHandle", "stores_codes_of", "LazyWeight", "ArrayWeight", "LoraAdapter", "Model",
    "tensor_names", "stored_tensors", "expected_shape", "build_llama_graph", "make_model",
]

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN_PROJECTIONS + MLP_PROJECTIONS
ROPE_TABLE = "rope.inv_freq"  # the inverse-frequency table, derived from the config and stored in ROM
EMBEDDING_TENSORS = ("embed_tokens", "lm_head")  # take the embedding format (the LM head is the tied or own one)


def projection_tensor(layer: int, module: str) -> str:
    """Canonical tensor name of one projection matrix, e.g. ``layers.3.mlp.up_proj``."""
    block = "self_attn" if module in ATTN_PROJECTIONS else "mlp"
    return f"layers.{layer}.{block}.{module}"


class OpKind(str, enum.Enum):
    EMBEDDING = "embedding"
    RMSNORM = "rmsnorm"
    LINEAR = "linear"
    ROPE = "rope"
    ATTENTION = "attention"
    SWIGLU = "swiglu"
    ADD = "add"
    LM_HEAD = "lm_head"


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters of a LLaMA-family decoder, as romac needs them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    rope_scaling: Mapping[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection, as stored (HF ``nn.Linear`` layout)."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_dim, h),
            "k_proj": (self.kv_dim, h),
            "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim),
            "gate_proj": (f, h),
            "up_proj": (f, h),
            "down_proj": (h, f),
        }[module]

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies (head_dim/2,) as float32, with LLaMA-3 scaling when configured."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        scaling = dict(self.rope_scaling or {})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            factor = float(scaling["factor"])
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        elif kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind == "explicit":  # frequencies read off a graph (ONNX) that follow no named schedule
            inv = np.asarray(scaling["inv_freq"], dtype=np.float64)
            if inv.shape != (dim // 2,):
                raise RomacError(f"explicit RoPE table has {inv.size} entries, head_dim {dim} needs {dim // 2}",
                                 where="rope_scaling")
        elif kind not in ("default", None):
            raise RomacError(
                f"RoPE scaling type {kind!r} is not supported",
                where="config.json rope_scaling",
                hint="supported: default, linear, llama3 (and explicit tables read from ONNX graphs)",
            )
        return inv.astype(np.float32)


class WeightHandle(Protocol):
    """A tensor that is read only when asked (memory-mapped where the source allows).

    Every handle offers float values (``load`` / ``load_rows``). A handle whose source stores quantized codes (a
    bitsandbytes, GPTQ or AWQ checkpoint) also says in which format (``codec_spec``: a
    ``romac.spec.formats`` spec; None for float sources) and gives those codes untouched (``load_quantized``).
    """

    name: str
    shape: tuple[int, ...]
    source: str
    codec_spec: Mapping[str, Any] | None

    def load(self) -> np.ndarray:
        """The whole tensor as float32."""
        ...

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, reading only those where the source allows."""
        ...

    # Optional (the emitter asks with getattr): ``load_rows_stored(start, stop, into=None)``, the same rows in the
    # source's own float dtype (float16, ml_dtypes.bfloat16, float32), whose float32 values are exactly
    # ``load_rows``', possibly read into the caller's uint8 buffer ``into``.

    def load_quantized(self) -> Any:
        """The stored codes as a ``romac.codecs.QuantTensor`` (only when ``codec_spec`` is not None)."""
        ...


def stores_codes_of(handle: WeightHandle, spec: Mapping[str, Any]) -> bool:
    """Whether the handle's source holds codes in exactly the format ``spec`` (so they pass through untouched)."""
    return handle.codec_spec is not None and dict(handle.codec_spec) == dict(spec)


class _FloatSource:
    """What float-only handles answer about stored codes."""

    codec_spec: Mapping[str, Any] | None = None

    def load_quantized(self) -> Any:
        raise TypeError(f"{self.name}: a float source stores no quantized codes")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LazyWeight(_FloatSource):
    """A weight read on demand by a loader function (the front-ends' memory-mapped readers use this)."""

    name: str
    shape: tuple[int, ...]
    loader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    source: str = ""
    row_loader: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False, compare=False)
    stored_row_loader: Callable[[int, int], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load(self) -> np.ndarray:
        return self.loader()

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, reading only those (when the source allows)."""
        if self.row_loader is not None:
            return self.row_loader(start, stop)
        return self.loader()[start:stop]

    def load_rows_stored(self, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) in the source's own float dtype (fp16, bf16 ...), which ``load_rows`` widens
        exactly to float32; ``load_rows`` itself where the source has no such reader. ``into``: a uint8 buffer
        the reader may fill and return a view of (the caller reuses it)."""
        if self.stored_row_loader is not None:
            return self.stored_row_loader(start, stop, into)
        return self.load_rows(start, stop)


@dataclass(frozen=True)
class ArrayWeight(_FloatSource):
    """A weight already in memory (generated models, small tensors)."""

    name: str
    array: np.ndarray = field(repr=False, compare=False)
    source: str = "<memory>"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def load(self) -> np.ndarray:
        return self.array

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT LoRA adapter: ``W x + scaling * B (A x)`` on the listed projections.

    ``weights`` maps a projection tensor name (``layers.0.self_attn.q_proj``) to its (A, B) handles,
    A of shape (rank, in_features) and B of shape (out_features, rank).
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    weights: Mapping[str, tuple[WeightHandle, WeightHandle]]
    source: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class Model:
    """The whole IR: config, op graph, weights, adapters, and what passes have added."""

    config: ModelConfig
    graph: nx.DiGraph
    weights: Mapping[str, WeightHandle]
    adapters: tuple[LoraAdapter, ...] = ()
    source: Mapping[str, Any] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    # The base's low-rank correction (L1 as B, L2 as A, scaling 1; a rank per projection): what the quantizer
    # fitted to the ROM's error, kept in SRAM and applied on every run. None: no correction.
    correction: LoraAdapter | None = None
    # The checkpoint's tokenizer as a tokenizers ``tokenizer.json`` text (None: the input carries none). Opaque to
    # the passes; the emitter writes it into the artifact directory so `romac run --prompt` can encode and decode.
    tokenizer: str | None = field(default=None, repr=False, compare=False)

    def ops(self) -> Iterator[tuple[str, dict]]:
        """Op nodes in execution (topological) order."""
        for node in nx.topological_sort(self.graph):
            yield node, self.graph.nodes[node]

    def with_plan(self, **changes: Any) -> "Model":
        """A copy whose plan has these fields replaced (what a pass returns)."""
        return dataclasses.replace(self, plan=self.plan.replace(**changes))

    def adapter(self, name: str) -> LoraAdapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)


def tensor_names(config: ModelConfig) -> list[str]:
    """Every weight tensor of a LLaMA decoder, in the order romac stores them."""
    names = ["embed_tokens"]
    for i in range(config.num_layers):
        names.append(f"layers.{i}.input_layernorm")
        names.extend(projection_tensor(i, m) for m in ATTN_PROJECTIONS)
        names.append(f"layers.{i}.post_attention_layernorm")
        names.extend(projection_tensor(i, m) for m in MLP_PROJECTIONS)
    names.append("norm")
    if not config.tie_word_embeddings:
        names.append("lm_head")
    return names


def stored_tensors(config: ModelConfig) -> list[str]:
    """Every tensor placed in ROM: the weights plus the tables derived from the config."""
    return tensor_names(config) + [ROPE_TABLE]


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape a tensor must have for this config (what front-ends check loaded headers against)."""
    if name == "embed_tokens" or name == "lm_head":
        return (config.vocab_size, config.hidden_size)
    if name == ROPE_TABLE:
        return (config.head_dim // 2,)
    if name == "norm" or name.endswith("layernorm"):
        return (config.hidden_size,)
    module = name.rsplit(".", 1)[1]
    return config.projection_shape(module)


def build_llama_graph(config: ModelConfig) -> nx.DiGraph:
    """The op graph of a LLaMA decoder; node ids name the op, node data says what it does.

    Node attributes: ``op`` (:class:`OpKind`), ``layer`` (int or None), ``weight`` (tensor name or None),
    ``inputs`` (the nodes it reads, in order), for linear ops ``module`` (q_proj ...), which is what LoRA adapters
    attach to, and for RoPE ``heads`` ("query" or "key_value": which head count its rows hold).
    """
    g = nx.DiGraph()

    def add(node: str, op: OpKind, inputs: tuple[str, ...], layer: int | None = None, **attrs: Any) -> str:
        g.add_node(node, op=op, layer=layer, inputs=inputs, **attrs)
        for src in inputs:
            g.add_edge(src, node)
        return node

    x = add("embed", OpKind.EMBEDDING, (), weight="embed_tokens")
    for i in range(config.num_layers):
        p = f"layers.{i}"
        h = add(f"{p}.input_layernorm", OpKind.RMSNORM, (x,), i, weight=f"{p}.input_layernorm")
        q = add(f"{p}.q_proj", OpKind.LINEAR, (h,), i, weight=projection_tensor(i, "q_proj"), module="q_proj")
        k = add(f"{p}.k_proj", OpKind.LINEAR, (h,), i, weight=projection_tensor(i, "k_proj"), module="k_proj")
        v = add(f"{p}.v_proj", OpKind.LINEAR, (h,), i, weight=projection_tensor(i, "v_proj"), module="v_proj")
        qr = add(f"{p}.rope_q", OpKind.ROPE, (q,), i, weight=ROPE_TABLE, heads="query")
        kr = add(f"{p}.rope_k", OpKind.ROPE, (k,), i, weight=ROPE_TABLE, heads="key_value")
        a = add(f"{p}.attention", OpKind.ATTENTION, (qr, kr, v), i)
        o = add(f"{p}.o_proj", OpKind.LINEAR, (a,), i, weight=projection_tensor(i, "o_proj"), module="o_proj")
        x = add(f"{p}.attn_residual", OpKind.ADD, (x, o), i)
        h = add(f"{p}.post_attention_layernorm", OpKind.RMSNORM, (x,), i, weight=f"{p}.post_attention_layernorm")
        gt = add(f"{p}.gate_proj", OpKind.LINEAR, (h,), i, weight=projection_tensor(i, "gate_proj"), module="gate_proj")
        up = add(f"{p}.up_proj", OpKind.LINEAR, (h,), i, weight=projection_tensor(i, "up_proj"), module="up_proj")
        s = add(f"{p}.swiglu", OpKind.SWIGLU, (gt, up), i)
        d = add(f"{p}.down_proj", OpKind.LINEAR, (s,), i, weight=projection_tensor(i, "down_proj"), module="down_proj")
        x = add(f"{p}.mlp_residual", OpKind.ADD, (x, d), i)
    h = add("norm", OpKind.RMSNORM, (x,), weight="norm")
    head = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    add("lm_head", OpKind.LM_HEAD, (h,), weight=head)
    return g


def make_model(
    config: ModelConfig,
    weights: Mapping[str, WeightHandle],
    adapters: tuple[LoraAdapter, ...] = (),
    source: Mapping[str, Any] | None = None,
) -> Model:
    """Assemble and check a Model: every tensor present with the shape the config implies."""
    for name in tensor_names(config):
        if name not in weights:
            raise RomacError(f"tensor {name!r} is missing", where=str((source or {}).get("path", "model")))
        want, got = expected_shape(config, name), tuple(weights[name].shape)
        if want != got:
            raise RomacError(
                f"tensor {name!r} has shape {got}, the config implies {want}",
                where=str(getattr(weights[name], "source", "") or "model"),
            )
    weights = {**weights, ROPE_TABLE: ArrayWeight(ROPE_TABLE, config.rope_inv_freq(), "config.json rope")}
    return Model(config, build_llama_graph(config), weights, tuple(adapters), dict(source or {}))
