"""A wheel of romac holds every subpackage: the package list in pyproject.toml names each directory with an
``__init__.py`` (an editable install finds them anyway, so only a regular install would notice a missing one)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    where = {name: ROOT / path for name, path in setup["package-dir"].items()}
    found = set()
    for name, top in where.items():
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top).parts
            if any(p in ("tests", "__pycache__") or p.startswith(".") for p in rel):
                continue
            parts = (name, *rel)
            # a directory of a mapped subpackage belongs to that mapping, not to "romac/<dir>"
            if ".".join(parts[:2]) in where and len(parts) > 1 and name != ".".join(parts[:2]):
                continue
            found.add(".".join(parts))
    assert found == set(setup["packages"]), (sorted(found - set(setup["packages"])),
                                              sorted(set(setup["packages"]) - found))
