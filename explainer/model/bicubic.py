"""PIL's antialiased bicubic resize of float images (``Image.resize(..., Image.BICUBIC)`` on mode 'F'),
computed on PIL's own coefficients: the library's resize of pixels and of maps.

The coefficients are ``precompute_coeffs`` of Pillow's Resample.c: a = -0.5, pixel centres, the kernel
widened by the scale when shrinking, each output's weights divided by their (sequential) sum. PIL
resizes a float image by a horizontal pass then a vertical one, each summing its taps in double from
the first input upwards and storing float32; here each pass is a sparse (CSR) product over those taps,
in float64, in the same order, rounded to float32 after each pass: the same arithmetic as PIL's, without
a PIL image per channel or per map, and with the images laid out so that the products stream through
memory (the horizontal pass works on blocks of rows transposed in the cache). Pillow 13 runs the vertical
pass first for some shapes (when the height shrinks much more than the width, a speed heuristic): there
the two differ by the float32 rounding of the other intermediate, at most about one ulp of the data's
magnitude (tests/test_resize.py)."""
from __future__ import annotations

import functools

import numpy as np

#: bytes of float64 a horizontal-pass block or a map chunk keeps in flight (about the size of an L2)
_BLOCK_BYTES = 1 << 20
#: bytes of float64 beyond which the vertical pass goes a block of columns at a time
_LARGE_BYTES = 1 << 22


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """PIL's ``bicubic_filter``, operation for operation, on an array of float64."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def band(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's taps for resizing a line of ``in_size`` pixels to ``out_size``: (first, count, weights),
    read-only; output pixel i reads inputs ``first[i] : first[i] + count[i]`` with ``weights[i, :count[i]]``
    (float64, zero beyond ``count[i]``)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    centre = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - first
    taps = int(np.ceil(support)) * 2 + 1
    x = np.arange(taps)
    weights = _bicubic(((x[None, :] + first[:, None]) - centre[:, None] + 0.5) * ss)
    weights[x[None, :] >= count[:, None]] = 0.0
    total = np.cumsum(weights, axis=1)[:, -1:]  # PIL's sequential sum (the zeros after count add nothing)
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    for array in (first, count, weights):
        array.flags.writeable = False
    return first, count, weights


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64: row i holds the weights PIL gives input pixels for output pixel i
    (``precompute_coeffs`` in PIL's Resample.c)."""
    first, count, weights = band(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        matrix[i, first[i]:first[i] + count[i]] = weights[i, :count[i]]
    return matrix


@functools.lru_cache(maxsize=64)
def _sparse(in_size: int, out_size: int):
    """PIL's taps as a (out_size, in_size) CSR matrix, indices ascending (PIL's order of summation),
    its arrays read-only."""
    from scipy.sparse import csr_matrix

    first, count, weights = band(in_size, out_size)
    keep = np.arange(weights.shape[1])[None, :] < count[:, None]
    indices = (first[:, None] + np.arange(weights.shape[1])[None, :])[keep]
    indptr = np.concatenate([[0], np.cumsum(count)])
    matrix = csr_matrix((weights[keep], indices, indptr), shape=(out_size, in_size))
    for array in (matrix.data, matrix.indices, matrix.indptr):
        array.flags.writeable = False
    return matrix


def _transpose(x: np.ndarray) -> np.ndarray:
    """(A, B, C) -> (B, A, C), contiguous, for any C (OpenCV's blocked transpose up to 4 channels)."""
    if x.shape[2] <= 4:
        import cv2

        return cv2.transpose(x).reshape(x.shape[1], x.shape[0], x.shape[2])
    return np.ascontiguousarray(x.transpose(1, 0, 2))


def _horizontal(x: np.ndarray, width: int) -> np.ndarray:
    """(H, W, C) float32 -> (H, width, C) float32: PIL's horizontal pass, a block of rows at a time."""
    rows, in_width, channels = x.shape
    matrix = _sparse(in_width, width)
    block = max(1, _BLOCK_BYTES // (8 * in_width * channels))
    out = np.empty((rows, width, channels), np.float32)
    for start in range(0, rows, block):
        part = _transpose(x[start:start + block])  # (W, b, C)
        b = part.shape[1]
        done = (matrix @ part.reshape(in_width, b * channels).astype(np.float64)).astype(np.float32)
        out[start:start + b] = _transpose(done.reshape(width, b, channels))
    return out


def _vertical(x: np.ndarray, height: int) -> np.ndarray:
    """(H, W, C) float32 -> (height, W, C) float32: PIL's vertical pass, in blocks of columns where the
    float64 copies would exceed ``_LARGE_BYTES``."""
    rows, width, channels = x.shape
    matrix, flat = _sparse(rows, height), x.reshape(rows, width * channels)
    columns = max(1, _LARGE_BYTES // (8 * max(rows, height)))
    if columns >= flat.shape[1]:
        return (matrix @ flat.astype(np.float64)).astype(np.float32).reshape(height, width, channels)
    out = np.empty((height, flat.shape[1]), np.float32)
    for start in range(0, flat.shape[1], columns):
        out[:, start:start + columns] = matrix @ flat[:, start:start + columns].astype(np.float64)
    return out.reshape(height, width, channels)


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (height, width, C) float32, PIL's bicubic on each channel as a float image."""
    (height, width), x = size, np.ascontiguousarray(pixels, np.float32)
    if x.shape[1] != width:
        x = _horizontal(x, width)
    if x.shape[0] != height:
        x = _vertical(x, height)
    return x


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., height, width) float32, PIL's bicubic on each map as a float image (unclipped)."""
    (height, width), x = size, np.ascontiguousarray(maps, np.float32)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, h, w)
    count = x.shape[0]
    if w != width:  # maps side by side, their columns first: (w, K * h)
        done = _sparse(w, width) @ _transpose(x.reshape(count * h, w, 1)).reshape(w, count * h).astype(np.float64)
        x = _transpose(done.astype(np.float32).reshape(width, count * h, 1)).reshape(count, h, width)
    if h != height:  # a chunk of maps at a time, their rows first: (h, k * width)
        matrix = _sparse(h, height)
        out = np.empty((count, height, width), np.float32)
        chunk = max(1, _BLOCK_BYTES // (8 * max(h, height) * width))
        for start in range(0, count, chunk):
            part = x[start:start + chunk]
            k = part.shape[0]
            done = matrix @ part.transpose(1, 0, 2).reshape(h, k * width).astype(np.float64)
            out[start:start + k] = done.reshape(height, k, width).transpose(1, 0, 2)
        x = out
    return x.reshape(*lead, height, width)
