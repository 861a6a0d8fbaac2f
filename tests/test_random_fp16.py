"""tools/modelkit/random_fp16.py: the inverse-CDF fp16 normals of the random-weight checkpoints."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import numpy as np

from tools.modelkit.random_fp16 import CHUNK, normal_fp16, normal_table

STD = 0.02
KS_BOUND = 0.003  # sup |empirical CDF - N(0, STD²) CDF| over 1.2 M draws (fp16 rounding included)


def _ks(values: np.ndarray, std: float) -> float:
    """Kolmogorov–Smirnov distance of ``values`` from N(0, std²), by a plain sort."""
    x = np.sort(values.astype(np.float64))
    cdf = np.array([NormalDist(0.0, std).cdf(v) for v in x[:: max(1, x.size // 20000)]])
    empirical = (np.arange(x.size)[:: max(1, x.size // 20000)] + 1) / x.size
    return float(np.max(np.abs(empirical - cdf)))


def test_table_is_the_ascending_symmetric_quantiles() -> None:
    table = normal_table(STD)
    assert table.shape == (65536,) and table.dtype == np.float16
    assert np.all(np.diff(table.astype(np.float64)) >= 0)
    np.testing.assert_array_equal(table, -table[::-1])  # (i + 0.5) / 65536 mirrors around 1/2
    assert abs(float(table[-1]) / STD - 4.33) < 0.01  # the outermost level, ~4.3 sigma


def test_values_follow_the_normal_and_do_not_depend_on_threads() -> None:
    shape = (4, CHUNK + 7)  # over four chunks, the last one partial
    table = normal_table(STD)
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(4) as four:
        a = normal_fp16(shape, table, np.random.SeedSequence([0, 3]), one)
        b = normal_fp16(shape, table, np.random.SeedSequence([0, 3]), four)
        c = normal_fp16(shape, table, np.random.SeedSequence([0, 4]), four)
    assert a.shape == shape and a.dtype == np.float16
    np.testing.assert_array_equal(a, b)
    assert np.mean(a == c) < 0.01  # another tensor index draws other values
    assert _ks(a.ravel(), STD) < KS_BOUND
    assert abs(float(a.astype(np.float64).std()) / STD - 1) < 0.005


def test_negative_control_a_wrong_scale_fails_the_bound() -> None:
    """The KS check can fail: the same draws scaled by 1.1 (a slip in the table's std) exceed it."""
    with ThreadPoolExecutor(2) as pool:
        wrong = normal_fp16((4, CHUNK + 7), normal_table(STD * 1.1), np.random.SeedSequence([0, 3]), pool)
    assert _ks(wrong.ravel(), STD) > KS_BOUND
