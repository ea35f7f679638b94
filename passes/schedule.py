"""Pass ``schedule``: lower the op graph to the instruction stream of one forward step.

Requires: ``regions`` (whose indices are region ids) and ``sram`` (whose slot indices are LoRA slot ids).
Provides: ``program`` — a tuple of :class:`romac.spec.isa.Instr` ending in HALT that
computes the logits of T new positions given the KV cache of the earlier ones; every LINEAR op is a MATVEC
followed by a LORA on its slot (a no-op for an adapter without that projection), so any adapter runs on
the same program — and, for a projection with a low-rank correction, a LORA ``corr`` on the correction region
between the two. Each op kind has one lowering rule; an op kind without one is an error naming it.
"""

from __future__ import annotations

from romac.errors import RomacError
from romac.ir import Model, OpKind
from romac.passes.options import CompileOptions
from romac.spec.isa import FLAG_CORRECTION, OPCODES, Buf, Instr, Opcode, f32_bits
from romac.targets import Target

REQUIRES = ("regions", "sram")
PROVIDES = ("program",)

# Which activation buffer holds each op's result.
_LINEAR_OUT = {"q_proj": Buf.Q, "k_proj": Buf.K, "v_proj": Buf.V, "o_proj": Buf.T,
               "gate_proj": Buf.G, "up_proj": Buf.U, "down_proj": Buf.T}
_OUT = {OpKind.EMBEDDING: Buf.X, OpKind.RMSNORM: Buf.H, OpKind.ATTENTION: Buf.ATT,
        OpKind.SWIGLU: Buf.G, OpKind.ADD: Buf.X, OpKind.LM_HEAD: Buf.LOGITS}


def schedule(model: Model, target: Target, options: CompileOptions) -> Model:
    cfg = model.config
    region = model.plan.region_ids()
    slot = {name: i for i, name in enumerate(model.plan.sram.slots)}
    corrected = {e.slot for e in model.plan.sram.correction.entries} if model.plan.sram.correction else set()
    buf: dict[str, Buf] = {}
    program: list[Instr] = []

    def emit(op: Opcode, comment: str, **fields) -> None:
        if not OPCODES[op].layer:  # the layer number is only encoded where the opcode uses it
            fields.pop("layer", None)
        program.append(Instr(op, comment=comment, **fields))

    for node, d in model.ops():
        kind, layer = d["op"], d["layer"] if d["layer"] is not None else 0
        ins = [buf[i] for i in d["inputs"]]
        if kind == OpKind.LINEAR:
            out = _LINEAR_OUT[d["module"]]
            emit(Opcode.MATVEC, d["weight"], dst=out, src0=ins[0], layer=layer, a=region[d["weight"]])
            if slot[d["weight"]] in corrected:  # the base's own low-rank correction, on every run
                emit(Opcode.LORA, f"{d['weight']} correction", dst=out, src0=ins[0], layer=layer,
                     a=slot[d["weight"]], flags=FLAG_CORRECTION)
            emit(Opcode.LORA, f"{d['weight']} lora", dst=out, src0=ins[0], layer=layer, a=slot[d["weight"]])
        elif kind == OpKind.ROPE:
            out = ins[0]
            heads = cfg.num_heads if out == Buf.Q else cfg.num_kv_heads
            emit(Opcode.ROPE, node, dst=out, src0=out, layer=layer, a=region[d["weight"]], b=heads)
        elif kind == OpKind.ATTENTION:
            q, k, v = ins
            out = _OUT[kind]
            emit(Opcode.KVSTORE, f"layers.{layer} kv cache", src0=k, src1=v, layer=layer)
            emit(Opcode.ATTN, node, dst=out, src0=q, layer=layer, a=cfg.num_heads, b=cfg.num_kv_heads)
        elif kind == OpKind.EMBEDDING:
            out = _OUT[kind]
            emit(Opcode.EMBED, d["weight"], dst=out, src0=Buf.TOK, a=region[d["weight"]])
        elif kind == OpKind.RMSNORM:
            out = _OUT[kind]
            emit(Opcode.RMSNORM, d["weight"], dst=out, src0=ins[0], layer=layer,
                 a=region[d["weight"]], b=f32_bits(cfg.rms_norm_eps))
        elif kind == OpKind.SWIGLU:
            out = _OUT[kind]
            emit(Opcode.SWIGLU, node, dst=out, src0=ins[0], src1=ins[1], layer=layer)
        elif kind == OpKind.ADD:
            out = _OUT[kind]
            emit(Opcode.ADD, node, dst=out, src0=ins[0], src1=ins[1], layer=layer)
        elif kind == OpKind.LM_HEAD:
            out = _OUT[kind]
            emit(Opcode.MATVEC, f"lm_head ({d['weight']})", dst=out, src0=ins[0], a=region[d["weight"]])
        else:
            raise RomacError(f"no lowering for op kind {kind!r}", where=f"node {node}",
                             hint="supported: " + ", ".join(k.value for k in OpKind))
        buf[node] = out
    emit(Opcode.HALT, "end of step")
    return model.with_plan(program=tuple(program))
