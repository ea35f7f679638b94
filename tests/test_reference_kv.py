"""The golden model's K/V rounding (reference.KvRounding): the chip's rounding is taken only at a tie.

A value within float32's error of an FP8 rounding boundary may round either way in the emulator (float32) and the
golden model (float64); both are then correct roundings of the same value up to the tolerance, and the golden model
takes the chip's. A chip value that is not such a rounding is never taken, so a wrong K/V still shows."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from romac.reference import KvRounding

FP8 = ml_dtypes.float8_e4m3fn


def _chip(values: np.ndarray) -> np.ndarray:
    """One layer's K and V cache as the emulator holds it, [1, 2, positions, dim]."""
    return np.stack([values, values])[None].astype(np.float32)


def test_a_tie_takes_the_chips_rounding_and_is_counted():
    # 1.0 and 1.125 are neighbours in e4m3; 1.0625 is the boundary between them
    x = np.array([[1.0625 - 1e-9, 0.5, 2.0]])           # float64: rounds down to 1.0
    chip = np.array([[1.125, 0.5, 2.0]])                  # the chip (float32) landed just above and rounded up
    kv = KvRounding("fp8_e4m3", _chip(chip), band=1e-5)
    k, v = kv(x, 0, 0), kv(x, 0, 1)
    assert k[0, 0] == 1.125 and v[0, 0] == 1.125
    assert kv.ties == 2 and kv.elements == 6


def test_a_value_that_is_no_tie_keeps_the_golden_rounding():
    x = np.array([[1.03, 0.5, 2.0]])                      # far from the boundary at 1.0625
    wrong = np.array([[1.125, 0.5, 2.0]])                 # a chip that stored the neighbour anyway
    kv = KvRounding("fp8_e4m3", _chip(wrong), band=1e-5)
    assert kv(x, 0, 0)[0, 0] == float(np.float64(1.03).astype(FP8)) == 1.0
    assert kv.ties == 0


def test_two_steps_away_is_never_a_tie():
    x = np.array([[1.0625 - 1e-9, 4.0]])
    chip = np.array([[1.25, 4.0]])                        # two FP8 steps above the golden rounding
    kv = KvRounding("fp8_e4m3", _chip(chip), band=1e-5)
    assert kv(x, 0, 1)[0, 0] == 1.0 and kv.ties == 0


def test_without_a_chip_it_is_plain_rounding():
    x = np.random.default_rng(0).standard_normal((4, 8))
    kv = KvRounding("fp8_e4m3")
    np.testing.assert_array_equal(kv(x, 0, 0), x.astype(FP8).astype(np.float64))
