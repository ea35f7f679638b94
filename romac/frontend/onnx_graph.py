"""An ONNX model as the ONNX front-end sees it: a checked file, a data-flow graph, constants and weights.

``OnnxGraph`` loads the protobuf without its external data, checks every external-data reference (a path
that leaves the model's directory, a missing file or a range past its end is refused), and answers what the
pattern matchers ask: who produces and who consumes a value, whether a value is a constant (and which),
whether it depends on the hidden state, and where a weight's bytes are. Weights stay where they are —
inside the protobuf or memory-mapped from the external file — until the emitter reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import networkx as nx
import numpy as np

from romac.errors import RomacError
from romac.ir import LazyWeight

# Ops that only compute positions, masks, shapes and indices (never touch the hidden state's values).
INDEX_OPS = frozenset({
    "Shape", "Size", "Range", "CumSum", "Equal", "Not", "And", "Or", "Xor", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Max", "Min", "Sub", "Constant", "ConstantOfShape", "GatherND", "GatherElements", "Trilu",
    "Abs", "Floor", "Ceil", "Mod", "Clip", "Tile", "Split", "Sign", "ScatterND", "Pad", "ReduceMax", "ReduceMin",
    "ReduceSum", "ArgMax", "NonZero", "TopK",
})
# Ops the recognised LLaMA patterns are made of.
PATTERN_OPS = frozenset({
    "Gather", "MatMul", "Gemm", "Pow", "Mul", "Div", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Sigmoid",
    "Softmax", "Neg", "Slice", "Concat", "Cos", "Sin", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand",
    "Flatten", "Identity", "Cast", "CastLike", "Where", "IsNaN", "RMSNormalization", "SimplifiedLayerNormalization",
})
SUPPORTED_OPS = INDEX_OPS | PATTERN_OPS
TRANSPARENT = frozenset({"Identity", "Cast", "CastLike"})
LAYOUT = TRANSPARENT | {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten"}
SHAPE_ONLY = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values

_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: "bfloat16"}
_CONST_LIMIT = 1 << 16  # elements: larger constants are weights, read lazily, never folded


@dataclass(frozen=True)
class WeightRef:
    """Where a weight matrix lives: an initializer, and whether it is stored transposed ([in, out])."""

    initializer: str
    transposed: bool


def describe(node) -> str:
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


class OnnxGraph:
    def __init__(self, path: str | Path) -> None:
        import onnx

        self.path = Path(path)
        self.base = self.path.resolve().parent
        try:
            self.proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # protobuf raises several unrelated types on a bad file
            raise RomacError(f"not a readable ONNX model ({type(e).__name__}: {e})", where=str(self.path),
                             hint="export with torch.onnx.export") from None
        g = self.proto.graph
        self.nodes = list(g.node)
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = [i for i in g.input if i.name not in self.initializers]
        self.outputs = list(g.output)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self._check_ops()
        for t in self.initializers.values():
            self._check_external(t)
        self._consts: dict[str, np.ndarray | None] = {}

    # ----- checks --------------------------------------------------------------------------------------
    def _check_ops(self) -> None:
        domains = {o.domain: o.version for o in self.proto.opset_import}
        for n in self.nodes:
            if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "com.microsoft"):
                continue
            if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
                where = f"{self.path}: {describe(n)}"
                if n.op_type in ("If", "Loop", "Scan"):
                    raise RomacError(f"control-flow op {n.op_type} is not supported", where=where,
                                     hint="export a static LLaMA graph (torch.onnx.export of LlamaForCausalLM)")
                raise RomacError(
                    f"unsupported op {n.domain + '.' if n.domain else ''}{n.op_type}", where=where,
                    hint="romac recognises LLaMA decoders built from: " + ", ".join(sorted(PATTERN_OPS)),
                )
        if domains.get("", domains.get("ai.onnx", 0)) < 13:
            raise RomacError(f"opset {domains.get('', 0)} is too old", where=str(self.path),
                             hint="export with opset 13 or newer")

    def _check_external(self, t) -> None:
        from onnx import TensorProto

        if t.data_location != TensorProto.EXTERNAL:
            return
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{self.path}: initializer {t.name!r}"
        if not loc or os.path.isabs(loc) or Path(loc).drive:
            raise RomacError(f"external data location {loc!r} is not a relative path", where=where,
                             hint="external data must live beside the .onnx file")
        target = (self.base / loc).resolve()
        if self.base not in target.parents:
            raise RomacError(f"external data location {loc!r} points outside the model's directory", where=where,
                             hint="external data must live in the .onnx file's directory; refusing to read elsewhere")
        if not target.is_file():
            raise RomacError(f"external data file {loc!r} is missing", where=where,
                             hint="copy the data file that torch.onnx.export wrote beside the .onnx")
        offset, length = int(info.get("offset", 0)), info.get("length")
        need = self.numel(t) * self.itemsize(t)
        if length is not None and int(length) != need:
            raise RomacError(f"external data length {length} does not match its shape and type ({need} bytes)",
                             where=where)
        if offset + need > target.stat().st_size:
            raise RomacError(f"external data range {offset}..{offset + need} runs past the end of {loc!r} "
                             f"({target.stat().st_size} bytes)", where=where, hint="the data file is truncated")

    # ----- tensors -------------------------------------------------------------------------------------
    @staticmethod
    def numel(t) -> int:
        return int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1

    def itemsize(self, t) -> int:
        dt = _FLOAT_TYPES.get(t.data_type)
        if dt == "bfloat16":
            return 2
        if dt is not None:
            return np.dtype(dt).itemsize
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    def tensor(self, name: str) -> np.ndarray:
        """An initializer's data (memory-mapped when external); float types come back as float32."""
        from onnx import TensorProto, numpy_helper

        t = self.initializers[name]
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            dt = _FLOAT_TYPES.get(t.data_type)
            raw_dtype = np.uint16 if dt == "bfloat16" else np.dtype(dt or np.float32)
            if dt is None:
                from onnx import helper

                raw_dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = np.memmap(self.base / info["location"], dtype=raw_dtype, mode="r",
                            offset=int(info.get("offset", 0)), shape=tuple(t.dims))
        elif _FLOAT_TYPES.get(t.data_type) == "bfloat16":
            arr = np.frombuffer(t.raw_data, dtype=np.uint16).reshape(tuple(t.dims)) if t.raw_data else \
                np.asarray(t.int32_data, dtype=np.uint16).reshape(tuple(t.dims))
        else:
            arr = numpy_helper.to_array(t)
        if _FLOAT_TYPES.get(t.data_type) == "bfloat16":
            return (np.asarray(arr, dtype=np.uint32) << 16).view(np.float32)
        if arr.dtype in (np.float16, np.float64):
            return arr.astype(np.float32)
        return arr

    def weight(self, ref: WeightRef, canonical: str) -> LazyWeight:
        """A lazy handle on a weight matrix in HF layout (out_features, in_features), float32."""
        t = self.initializers[ref.initializer]
        if _FLOAT_TYPES.get(t.data_type) is None:
            raise RomacError(f"weight has element type {t.data_type}, expected a float type",
                             where=f"{self.path}: initializer {ref.initializer!r}")
        dims = tuple(int(d) for d in t.dims)
        shape = (dims[1], dims[0]) if ref.transposed else dims

        def load() -> np.ndarray:
            a = self.tensor(ref.initializer)
            return np.ascontiguousarray((a.T if ref.transposed else a), dtype=np.float32)

        def rows(start: int, stop: int) -> np.ndarray:
            a = self.tensor(ref.initializer)
            part = a[:, start:stop].T if ref.transposed else a[start:stop]
            return np.ascontiguousarray(part, dtype=np.float32)

        return LazyWeight(canonical, shape, load, f"{self.path}:{ref.initializer}", rows)

    # ----- constants -----------------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a (small) constant, else None."""
        if name in self._consts:
            return self._consts[name]
        value = self._fold(name)
        self._consts[name] = value
        return value

    def _fold(self, name: str) -> np.ndarray | None:
        from onnx import helper, numpy_helper

        if name in self.initializers:
            t = self.initializers[name]
            return self.tensor(name) if self.numel(t) <= _CONST_LIMIT else None
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            a = node.attribute[0]
            v = helper.get_attribute_value(a)
            return numpy_helper.to_array(v) if a.name == "value" else np.asarray(v)
        if node.op_type in SHAPE_ONLY or node.op_type in ("If", "Loop", "Scan"):
            return None
        if node.op_type == "CastLike":  # its second input gives only the element type
            v = self.const(node.input[0])
            return None if v is None else np.asarray(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype)
        ins = [self.const(i) if i else None for i in node.input]
        if any(v is None for v, i in zip(ins, node.input) if i):
            return None
        from onnx.reference import ReferenceEvaluator

        try:
            g = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in node.input if i],
                                  [helper.make_tensor_value_info(o, 0, None) for o in node.output])
            m = helper.make_model(g, opset_imports=list(self.proto.opset_import))
            outs = ReferenceEvaluator(m).run(None, {i: v for i, v in zip(node.input, ins) if i})
        except Exception:
            return None
        for o, v in zip(node.output, outs):
            self._consts[o] = np.asarray(v)
        return self._consts.get(name)

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None or v.size != 1:
            return None
        return float(np.asarray(v, dtype=np.float64).reshape(()))

    def weight_ref(self, name: str) -> WeightRef | None:
        """If ``name`` is a 2-D weight matrix as a MatMul's right operand sees it ([in, out]), where it lives."""
        transposes = 0
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type not in TRANSPARENT | {"Transpose"}:
                return None
            if node.op_type == "Transpose":
                perm = [int(p) for p in next((a.ints for a in node.attribute if a.name == "perm"), [1, 0])]
                if perm != [1, 0]:
                    return None
                transposes += 1
            name = node.input[0]
        t = self.initializers[name]
        if len(t.dims) != 2 or _FLOAT_TYPES.get(t.data_type) is None:
            return None
        return WeightRef(name, transposed=transposes % 2 == 0)

    # ----- data flow -----------------------------------------------------------------------------------
    def descendants(self, roots: Iterable[str]) -> set[str]:
        """Values whose contents depend on ``roots`` (shape reads do not count)."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            for n in self.consumers.get(v, ()):
                if n.op_type in SHAPE_ONLY or n.op_type == "CastLike" and n.input[0] != v:
                    continue  # reads only the shape or the element type of v
                todo.extend(o for o in n.output if o)
        return seen

    def nx_graph(self) -> nx.DiGraph:
        """Nodes as a networkx DiGraph (node index -> node index along values), for order and reachability."""
        g = nx.DiGraph()
        index = {id(n): k for k, n in enumerate(self.nodes)}
        for k, n in enumerate(self.nodes):
            g.add_node(k)
            for i in n.input:
                p = self.producer.get(i)
                if p is not None:
                    g.add_edge(index[id(p)], k)
        return g

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def where(self, node) -> str:
        return f"{self.path}: {describe(node)}"
