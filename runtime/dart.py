"""DART's duplicate-aware selection (method.md §7, strategy ``dart``), pure NumPy.

Inputs are the probe's layer-P−1 keys (RoPE applied, heads concatenated per token) and ``H`` (the
final RMSNorm of layer P−1's output), split into the image rows and the question's text tokens
after the image. Norms and cosines are computed in float64 (only rankings leave this module); kept
indices come back int64, sorted ascending. Choices where §7 is silent:

- Ties (exact floating-point equality) go to the smaller index, for pivots and for picks alike;
  a cosine is computed as ``(h_c · h_p) / (|h_c| |h_p|)`` in that order, so equal inputs tie exactly.
- Zero rows: every L2 norm is clipped at ``NORM_FLOOR`` before a cosine, so a zero ``H`` row has
  cosine 0 with every pivot.
- ``p_img`` and ``p_txt`` may be 0, but at least one pivot must exist (InputError otherwise); with
  no text tokens (M = 0) the image pivots take the whole budget. Non-finite inputs: ValueError.
- Budget: the quotas sum to ``K − p_img`` and the candidates number ``N − p_img >= K − p_img``, so
  a pivot never runs out of rows; a quota of 0 (more pivots than rows to share) picks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.selection import check_budget, top_k

NORM_FLOOR = 1e-6  # L2 norms are clipped here before a cosine (method.md is silent; as DivPrune)
IMAGE_PIVOTS = 4  # p_img, method.md §7 default
TEXT_PIVOTS = 4  # p_txt, method.md §7 default


def dart_pivots(keys: np.ndarray, count: int) -> np.ndarray:
    """The ``min(count, T)`` rows of ``keys [T, Dk]`` with the largest L1 norm, int64, largest first.

    Ties go to the smaller index. Example: keys = [[3, 0], [2, 2], [1, -1]], count 2 -> [1, 0]
    (L1 norms 3, 4, 2; by L2 norm, 3 > 2.83, it would be [0, 1]).
    """
    k = _finite_matrix("keys", keys, allow_empty=True)
    _check_count("count", count)
    return top_k(_key_norms(k), min(int(count), k.shape[0]))


def dart_quotas(budget: int, image_pivots: int, pivots: int) -> np.ndarray:
    """Rows ``[pivots]`` int64 each pivot keeps: ``floor((K − p_img) / p)``, one more for the first
    ``(K − p_img) mod p``.

    Example: K = 10, p_img = 4, p = 4 + 4 = 8: 6 rows to share -> [1, 1, 1, 1, 1, 1, 0, 0].
    """
    if pivots < 1 or not 0 <= image_pivots <= pivots or budget < image_pivots:
        raise ValueError(f"need 0 <= p_img <= p, p >= 1 and K >= p_img, got K={budget}, "
                         f"p_img={image_pivots}, p={pivots}")
    share, extra = divmod(int(budget) - int(image_pivots), int(pivots))
    return share + (np.arange(pivots) < extra).astype(np.int64)


@dataclass(frozen=True)
class DartChoice:
    """What DART chose: the kept rows and the pivots and quotas that chose them."""

    kept: np.ndarray  # [K] int64 image rows, ascending
    image_pivots: np.ndarray  # [<= p_img] int64 image rows, largest key L1 norm first
    text_pivots: np.ndarray  # [<= p_txt] int64 text positions, largest first (empty when K <= p_img)
    quotas: np.ndarray  # [pivots] int64 rows each pivot kept (empty when K <= p_img)


def dart_indices(
    image_keys: np.ndarray,
    text_keys: np.ndarray,
    image_hidden: np.ndarray,
    text_hidden: np.ndarray,
    budget: int,
    p_img: int = IMAGE_PIVOTS,
    p_txt: int = TEXT_PIVOTS,
) -> np.ndarray:
    """DART's kept image rows ``[K]`` int64 ascending, from keys ``image_keys [N, Dk]``, ``text_keys
    [M, Dk]`` and hidden states ``image_hidden [N, E]``, ``text_hidden [M, E]`` (M may be 0).

    Image pivots, then text pivots, each by descending key L1 norm; each pivot in turn keeps its quota
    of the unkept, non-pivot image rows whose ``H`` is least cosine-similar to its own ``H``; if
    ``K <= p_img`` the top K image pivots are the answer.
    Example: H at 0°, 90°, 180°, 45°, key L1 norms [1, 1, 1, 9], no text, p_img = 1, K = 2: pivot 3
    (45°) keeps the least similar of 0, 1, 2 (cos 0.71, 0.71, −0.71) -> [2, 3].
    """
    return dart_select(image_keys, text_keys, image_hidden, text_hidden, budget, p_img, p_txt).kept


def dart_select(
    image_keys: np.ndarray,
    text_keys: np.ndarray,
    image_hidden: np.ndarray,
    text_hidden: np.ndarray,
    budget: int,
    p_img: int = IMAGE_PIVOTS,
    p_txt: int = TEXT_PIVOTS,
) -> DartChoice:
    """:func:`dart_indices` with the pivots and quotas it used (for reports)."""
    ik = _finite_matrix("image_keys", image_keys)
    tk = _finite_matrix("text_keys", text_keys, allow_empty=True)
    ih = _finite_matrix("image_hidden", image_hidden)
    th = _finite_matrix("text_hidden", text_hidden, allow_empty=True)
    n, m = ik.shape[0], tk.shape[0]
    _check_shape("text_keys", tk, (m, ik.shape[1]))
    _check_shape("image_hidden", ih, (n, ih.shape[1]))
    _check_shape("text_hidden", th, (m, ih.shape[1]))
    budget = check_budget(budget, n)
    _check_count("p_img", p_img)
    _check_count("p_txt", p_txt)
    image_pivots = dart_pivots(ik, p_img)
    none = np.zeros(0, np.int64)
    if budget <= image_pivots.shape[0]:
        return DartChoice(np.sort(image_pivots[:budget]), image_pivots, none, none)
    text_pivots = dart_pivots(tk, p_txt)
    pivot_hidden = np.concatenate([ih[image_pivots], th[text_pivots]])
    if pivot_hidden.shape[0] == 0:
        raise InputError(f"dart needs at least one pivot: p_img={p_img}, p_txt={p_txt}, text tokens {m}")
    quotas = dart_quotas(budget, image_pivots.shape[0], pivot_hidden.shape[0])
    return DartChoice(_pick_least_similar(ih, image_pivots, pivot_hidden, quotas), image_pivots, text_pivots, quotas)


def _pick_least_similar(
    hidden: np.ndarray, image_pivots: np.ndarray, pivot_hidden: np.ndarray, quotas: np.ndarray
) -> np.ndarray:
    """Image pivots plus, per pivot row of ``pivot_hidden [p, E]``, its quota of least similar rows."""
    taken = np.zeros(hidden.shape[0], dtype=bool)
    taken[image_pivots] = True
    norms = _l2_norms(hidden)
    for h, quota in zip(pivot_hidden, quotas, strict=True):
        rest = np.flatnonzero(~taken)  # ascending, so ties still go to the smaller index
        cosine = (hidden[rest] @ h) / (norms[rest] * _l2_norms(h[None, :])[0])
        taken[rest[top_k(-cosine, int(quota))]] = True
    return np.flatnonzero(taken).astype(np.int64)


def _key_norms(keys: np.ndarray) -> np.ndarray:
    """L1 norms ``[T]`` float64 of ``keys [T, Dk]`` (method.md §7.2)."""
    return np.abs(keys).sum(axis=1)


def _l2_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms ``[n]`` float64 of ``x [n, d]``, clipped at ``NORM_FLOOR``."""
    return np.maximum(np.sqrt((x * x).sum(axis=1)), NORM_FLOOR)


def _finite_matrix(name: str, x: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a float64 ``[rows, cols >= 1]`` matrix of finite values (rows >= 1 unless ``allow_empty``)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1 or (a.shape[0] < 1 and not allow_empty):
        rows = "rows >= 0" if allow_empty else "rows >= 1"
        raise ValueError(f"{name} must be a 2-D matrix [{rows}, cols >= 1], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _check_shape(name: str, a: np.ndarray, expected: tuple[int, int]) -> None:
    if a.shape != expected:
        raise ValueError(f"{name} must have shape {expected}, got {a.shape}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")
