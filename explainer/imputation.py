"""Noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ROAD): removed pixels are filled from their neighbours instead of a fixed colour.

Why: filling removed pixels with one colour lets the *shape* of what was removed speak to the
network (scattered grey dots destroy texture cues faster than any region), so a deletion curve then
ranks pixel noise above every real map. Each removed pixel instead takes the weighted mean of its
eight neighbours (1/6 edge, 1/12 diagonal; known neighbours fixed, removed ones solved for jointly),
plus a little seeded noise so that the fill is not perfectly smooth.
"""
from __future__ import annotations

import numpy as np

NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
NOISE = 0.01 * 255  # ROAD's noise (0.01 on images in [0, 1]), in pixel levels


def impute(pixels: np.ndarray, removed: np.ndarray, *, noise: float = NOISE, random_state: int = 0) -> np.ndarray:
    """``pixels`` (H, W, C) with the pixels where ``removed`` (H, W, bool) is True filled by noisy
    linear imputation; float32, clipped to 0..255."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    h, w, c = pixels.shape
    removed = np.asarray(removed, bool)
    out = np.array(pixels, dtype=np.float64)
    unknown = np.flatnonzero(removed)
    if unknown.size == 0:
        return out.astype(np.float32)
    if unknown.size == h * w:  # nothing to impute from: the mean colour
        out[:] = out.reshape(-1, c).mean(axis=0)
        return out.astype(np.float32)
    flat = out.reshape(-1, c)
    variable = np.full(h * w, -1, np.int64)
    variable[unknown] = np.arange(unknown.size)
    rows, cols = unknown // w, unknown % w
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    a_rows, a_cols, a_vals = [], [], []
    for (dr, dc), weight in NEIGHBOURS:
        r, q = rows + dr, cols + dc
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        eq = np.flatnonzero(inside)
        neighbour = r[inside] * w + q[inside]
        diagonal[eq] -= weight
        is_unknown = removed.ravel()[neighbour]
        a_rows.append(eq[is_unknown])
        a_cols.append(variable[neighbour[is_unknown]])
        a_vals.append(np.full(int(is_unknown.sum()), weight))
        rhs[eq[~is_unknown]] -= weight * flat[neighbour[~is_unknown]]
    n = unknown.size
    a_rows.append(np.arange(n))
    a_cols.append(np.arange(n))
    a_vals.append(diagonal)
    system = coo_matrix((np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))),
                        shape=(n, n)).tocsc()
    solution = spsolve(system, rhs).reshape(n, c)
    if noise:
        solution = solution + noise * np.random.default_rng(random_state).standard_normal(solution.shape)
    flat[unknown] = solution
    return np.clip(out, 0, 255).astype(np.float32)
