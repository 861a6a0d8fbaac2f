"""Fast iid fp16 normals for random-weight checkpoints, by inverse-CDF lookup.

Uniform 16-bit integers index a table of the 65,536 fp16 quantiles of N(0, std²) at
(i + 0.5) / 65536: iid samples of a normal discretised to equal-probability levels (|x| <= 4.3
sigma) -- fp16 has fewer distinct values anyway. That is ~4x faster than float32 normals + cast
(~250 vs ~56 M values/s on 2 cores). One generator per ``CHUNK`` values, each seeded by spawning
from the caller's ``SeedSequence`` in chunk order, so the values depend on the seed and the shape
only, not on the thread count; chunks run on the caller's thread pool.
"""

from __future__ import annotations

from concurrent.futures import Executor
from statistics import NormalDist

import numpy as np

CHUNK = 1 << 18  # values per generator: a 512 KB temporary of random bytes per thread


def normal_table(std: float) -> np.ndarray:
    """[65536] fp16 quantiles of N(0, std²) at (i + 0.5) / 65536, ascending: a lookup for uniform uint16."""
    dist = NormalDist(0.0, std)
    return np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float16)


def normal_fp16(shape: tuple[int, ...], table: np.ndarray, seed: np.random.SeedSequence,
                pool: Executor) -> np.ndarray:
    """fp16 array of ``shape`` with iid values of ``table`` (uniform uint16 index), one generator per chunk."""
    out = np.empty(shape, dtype=np.float16)
    flat = out.reshape(-1)
    starts = range(0, flat.size, CHUNK)

    def fill(start: int, child: np.random.SeedSequence) -> None:
        part = flat[start:start + CHUNK]
        np.take(table, np.frombuffer(np.random.default_rng(child).bytes(2 * part.size), dtype=np.uint16), out=part)

    for _ in pool.map(fill, starts, seed.spawn(len(starts))):
        pass
    return out
