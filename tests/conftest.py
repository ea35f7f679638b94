"""Shared fixtures: small models built in memory, compiled into temporary artifact directories."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import tempfile
from pathlib import Path

import numba
import numpy as np
import pytest

from romac.driver import compile_model
from romac.emulator import Machine
import romac.emulator.kernels as kernels
from romac.frontend.builtin import random_adapter, random_weights
from romac.ir import ModelConfig, make_model
from romac.passes import CompileOptions
from romac.targets import load_target


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=200, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
    )
    base.update(overrides)
    return ModelConfig(**base)


def small_model(config: ModelConfig, seed: int = 0, adapters: int = 1, modules=None):
    from romac.ir import PROJECTIONS

    ads = tuple(
        random_adapter(config, f"ad{k}", seed=100 + k, rank=4 + 4 * k, modules=modules or PROJECTIONS)
        for k in range(adapters)
    )
    return make_model(config, random_weights(config, seed), ads, source={"kind": "test", "path": "memory"})


@pytest.fixture
def compile_small(tmp_path):
    """compile_small(model, target=None, options=...) -> artifact dir (a fresh one per call)."""
    counter = iter(range(1000))

    def run(model, target=None, options=None, name=None):
        from romac.passes import CompileOptions

        out = tmp_path / (name or f"out{next(counter)}")
        compile_model(model, out, target, options or CompileOptions())
        return out

    return run


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def trained_like_llama(perturb_norms: bool = False):
    """A small transformers LlamaForCausalLM (GQA, untied) with trained-like weight scales, seeded."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-like scales: default init gives near-uniform logits
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
            elif perturb_norms:  # norms start at ones; make them informative
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A small LLaMA written by transformers and a LoRA adapter written by peft: (model_dir, adapter_dir)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("hf")
    model = trained_like_llama()
    model.save_pretrained(root / "base")
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def kernel_case_machine(case: tuple, tmp_path_factory):
    """A Machine on a one-layer random model compiled for a kernel test case: (id, model shape, target changes,
    compile options)."""
    name, shape, tgt, opts = case
    model = small_model(small_config(num_layers=1, **shape), adapters=0)
    target = dataclasses.replace(load_target("tiny"), **tgt)
    out = tmp_path_factory.mktemp(name) / "out"
    compile_model(model, out, target, CompileOptions(quant_embedding=opts["quant"], **opts))
    return Machine(out)


def on_threads(n: int, f):
    """f() with numba's thread count (which the native kernels use) set to n, then restored."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        return f()
    finally:
        numba.set_num_threads(before)


def _compiled_once_across_workers(fn, kind_of):
    """``fn`` whose first call for each kind of kernel holds a lock shared by pytest-xdist's workers: one worker
    compiles the numba kernel (tens of seconds) and writes numba's cache; the others wait, then load it."""
    warm: set = set()
    locks = Path(tempfile.gettempdir()) / f"romac-numba-locks-{os.getuid()}"
    locks.mkdir(exist_ok=True)

    @functools.wraps(fn)
    def call(*args):
        kind = kind_of(args)
        if kind in warm:
            return fn(*args)
        with open(locks / f"{fn.__name__}-{kind}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            out = fn(*args)
        warm.add(kind)
        return out

    return call


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of a parallel run (`-n auto` in pyproject.toml)
        kind = lambda args: "%d_%d" % kernels.kernel_kind(args[3])
        kernels.matmul = _compiled_once_across_workers(kernels.matmul, kind)
        kernels.rows = _compiled_once_across_workers(kernels.rows, lambda args: "generic")
