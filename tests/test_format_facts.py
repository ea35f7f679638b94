"""Every format fact lives in romac/spec: a module outside it that branches on a format name, lists format names,
tabulates something per format, or spells out bitsandbytes' blocksizes fails this test (by reading the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from romac.spec.formats import BNB_BLOCKSIZES, ELEMENT_FORMATS, STORAGES, WEIGHT_FORMATS

ROOT = Path(__file__).resolve().parents[1]
NAMES = set(WEIGHT_FORMATS) | set(ELEMENT_FORMATS) | set(STORAGES)
SOURCES = sorted(p for top in ("romac", "passes", "targets") for p in (ROOT / top).rglob("*.py")
                 if "spec" not in p.relative_to(ROOT).parts)


def _names(node: ast.AST) -> list[str]:
    """Format names among a literal's elements (or the literal itself)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in NAMES]


def format_facts(source: str) -> list[tuple[int, str]]:
    """(line, what) of every format fact written in a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_names(c) for c in [node.left, *node.comparators]):
            found.append((node.lineno, f"branch on a format name {_names(node.left) or _names(node.comparators[0])}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_names(node)) >= 2:
            found.append((node.lineno, f"a list of format names {_names(node)}"))
        elif isinstance(node, ast.Dict) and sum(1 for k in node.keys if k is not None and _names(k)) >= 2:
            found.append((node.lineno, "a table keyed by format names"))
        elif isinstance(node, (ast.Tuple, ast.List)):
            ints = {e.value for e in node.elts if isinstance(e, ast.Constant) and type(e.value) is int}
            if {32, 2048, 4096} <= ints and len(ints & set(BNB_BLOCKSIZES)) >= 6:
                found.append((node.lineno, "bitsandbytes' blocksize list"))
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_format_fact_outside_spec(path):
    facts = format_facts(path.read_text(encoding="utf-8"))
    assert not facts, "; ".join(f"line {n}: {what}" for n, what in facts)


def test_the_guard_sees_facts():
    """It flags what it is meant to flag (and passes what it is not)."""
    flagged = format_facts('if fmt in ("nf4", "fp4"):\n    pass\nBITS = {"fp32": 32, "fp16": 16}\n'
                           'if x == "int4": pass\nB = (32, 64, 128, 256, 512, 1024, 2048, 4096)\n')
    assert sorted(n for n, _ in flagged) == [1, 1, 3, 4, 5]
    assert not format_facts('codec = get_codec("fp32")\nname = "nf4 checkpoint"\nW = (8, 16, 32, 64, 128)\n')
