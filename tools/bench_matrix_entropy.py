"""Benchmark the dual-Gram matrix entropy against the direct d×d covariance (method.md §2).

Prints one row per (n, d): best-of-repeats time of ``matrix_entropy`` (the smaller side) and of
``matrix_entropy_direct`` (always d×d), the speed-up, and the max |Δ| of the Gram and covariance
normalised spectra (top min(n, d) values) and of the entropies. Exits 1 when a spectrum
differs by more than the tolerance; timings are reported, never asserted.

    python -m tools.bench_matrix_entropy --n 16 64 576 --d 64 1024 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from runtime.matrix_entropy import Side, normalised_spectrum, spectrum_entropy

SPECTRUM_TOL = 1e-6  # the two sides share the non-zero spectrum; float64 round-off is ~1e-15


@dataclass(frozen=True)
class BenchRow:
    """One (n, d) shape: timings in milliseconds and the dual-vs-direct differences."""

    n: int
    d: int
    dual_ms: float
    direct_ms: float
    spectrum_diff: float  # max |Δλ| over the top min(n, d) eigenvalues
    entropy_diff: float  # |M_dual − M_direct|


def _timed(z: np.ndarray, side: Side, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time (ms) of ``repeats`` matrix entropies on ``side``, and that side's spectrum."""
    best, eig = float("inf"), np.zeros(0)
    for _ in range(repeats):
        start = time.perf_counter()
        eig = normalised_spectrum(z, side=side)
        spectrum_entropy(eig)
        best = min(best, time.perf_counter() - start)
    return best * 1e3, eig


def bench_shape(n: int, d: int, repeats: int, seed: int) -> BenchRow:
    """Time both sides on a seeded Gaussian ``[n, d]`` matrix and compare their spectra."""
    z = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    m = min(n, d)
    dual_ms, dual = _timed(z, "auto", repeats)  # what matrix_entropy does
    direct_ms, direct = _timed(z, "covariance", repeats)  # what matrix_entropy_direct does
    if n >= d:  # "auto" took the covariance side too: check against the n×n Gram instead
        dual = normalised_spectrum(z, side="gram")
    return BenchRow(
        n=n, d=d, dual_ms=dual_ms, direct_ms=direct_ms,
        spectrum_diff=float(np.abs(dual[:m] - direct[:m]).max()),
        entropy_diff=abs(spectrum_entropy(dual) - spectrum_entropy(direct)),
    )


def format_table(rows: list[BenchRow]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'n':>6} {'d':>6} {'dual ms':>10} {'direct ms':>10} {'speed-up':>9} "
             f"{'max|Δλ|':>10} {'|ΔM|':>10}"]
    for r in rows:
        lines.append(f"{r.n:>6} {r.d:>6} {r.dual_ms:>10.3f} {r.direct_ms:>10.3f} "
                     f"{r.direct_ms / max(r.dual_ms, 1e-9):>8.1f}x "
                     f"{r.spectrum_diff:>10.2e} {r.entropy_diff:>10.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16, 64, 144, 576],
                        help="token counts n (default: 16 64 144 576)")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 256, 1024, 4096],
                        help="feature widths d (default: 64 256 1024 4096)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls per side, best kept; raise for steadier small-shape "
                             "timings (default: 1; a direct d=4096 takes seconds)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.n + args.d) < 1:
        parser.error("--n, --d and --repeats must be positive")
    rows = []
    for n in args.n:
        for d in args.d:
            print(f"timing n={n} d={d} ...", file=sys.stderr)
            rows.append(bench_shape(n, d, args.repeats, args.seed))
    print(format_table(rows))
    worst = max(r.spectrum_diff for r in rows)
    if worst > SPECTRUM_TOL:
        print(f"✗ spectra differ by {worst:.2e} > {SPECTRUM_TOL:.0e}", file=sys.stderr)
        return 1
    print(f"✓ spectra agree within {SPECTRUM_TOL:.0e} (max {worst:.2e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
