"""What the chip would hold does not change by accident: ROM, SRAM and program bytes equal those recorded at
commit bc15314 (``tests/image_digests.py`` says how they were recorded and when to record again)."""

from __future__ import annotations

import json

import pytest

from tests.image_digests import CASES, DIGESTS, REAL_MODEL, image_digests

RECORDED = json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_images_are_byte_identical(case, tmp_path):
    if case in REAL_MODEL:
        pytest.importorskip("torch")
        pytest.importorskip("peft")
    CASES[case](tmp_path / case)
    got, want = image_digests(tmp_path / case), RECORDED[case]
    assert sorted(got) == sorted(want), "a different set of image files"
    changed = sorted(f for f in want if got[f] != want[f])
    assert not changed, f"{len(changed)} of {len(want)} files changed, e.g. {changed[:5]}"
