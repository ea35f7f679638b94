"""romac/frontend/rawio.py: byte ranges read from the page cache, past it (O_DIRECT), or buffered, always the same
bytes; and the safetensors reader's streamed rows through it equal the plain reader's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from romac.frontend import rawio
from romac.frontend.safetensors_io import SafetensorsFile, write_safetensors

SIZE = 3 * 1024 * 1024 + 12345  # not a whole number of pages


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path_factory.mktemp("rawio") / "blob.bin"
    path.write_bytes(data)
    return path, data


def _evict(path: Path) -> None:
    """Drop the file from the page cache (so that the O_DIRECT path runs), where the system allows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


RANGES = [(0, 100), (1, 4095), (4095, 2), (4096, 8192), (12345, 1 << 20), (SIZE - 5000, 5000), (SIZE - 1, 1),
          (0, SIZE), (777, 0)]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "evicted"])
@pytest.mark.parametrize("offset,count", RANGES)
def test_ranges_read_back_exactly(blob, offset, count, cached):
    path, data = blob
    if cached:
        path.read_bytes()
    else:
        _evict(path)
    scratch = np.empty(rawio.scratch_bytes(count) + 3, np.uint8)[3:]  # a misaligned start too
    view, got = rawio.read_range(path, offset, count, scratch)
    assert got == count and view.tobytes() == data[offset:offset + count]
    assert np.shares_memory(view, scratch) or count == 0


@pytest.mark.parametrize("no", ["_DIRECT", "_NOWAIT", "both"])
def test_without_o_direct_or_nowait(blob, monkeypatch, no):
    path, data = blob
    for name in (["_DIRECT", "_NOWAIT"] if no == "both" else [no]):
        monkeypatch.setattr(rawio, name, 0)
    _evict(path)
    view, got = rawio.read_range(path, 5000, 100_000, np.empty(rawio.scratch_bytes(100_000), np.uint8))
    assert got == 100_000 and view.tobytes() == data[5000:105_000]


def test_past_the_end_is_a_short_read(blob):
    path, data = blob
    _evict(path)
    view, got = rawio.read_range(path, SIZE - 10, 100, np.empty(rawio.scratch_bytes(100), np.uint8))
    assert got == 10 and view[:got].tobytes() == data[-10:]


def test_a_scratch_too_small_is_refused(blob):
    with pytest.raises(ValueError):
        rawio.read_range(blob[0], 0, 10_000, np.empty(10_000, np.uint8))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_streamed_rows_equal_the_plain_reader(tmp_path, dtype):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 5)).astype(dtype), "w": rng.standard_normal((300, 1000)).astype(dtype)}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    _evict(tmp_path / "m.safetensors")
    scratch = np.empty(4 * 300 * 1000 + (16 << 10), np.uint8)
    for r0, r1 in [(0, 300), (7, 8), (123, 299)]:
        got = f.load_stored("w", slice(r0, r1), scratch)
        assert got.dtype == dtype and np.array_equal(got, tensors["w"][r0:r1])
        assert np.array_equal(f.load("w", slice(r0, r1)), tensors["w"][r0:r1].astype(np.float32))
