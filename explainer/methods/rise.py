"""RISE (Petsiuk, Das & Saenko 2018): randomized input sampling, forward passes only, on onnxruntime
(or the converted module).

The image is resized to the network's input size. Each of ``num_masks`` soft masks keeps part of it
and blends the rest toward ``mask_value``; the map is the masks weighted by the class probability of
their masked image, ``S_c = sum_i P_c(M_i * image + (1 - M_i) * fill) * M_i / (N * keep_probability)``:
about the class probability when a pixel is kept. All labels share the forward passes.

Masks are those of the paper's code (eclique/RISE ``generate_masks``): a random binary
``grid_size`` x ``grid_size`` grid (1 with probability ``keep_probability``), upsampled bilinearly
(skimage ``resize(order=1, mode="reflect")``) to ``(grid_size + 1) x cell`` (cell = ceil(input size /
grid_size)) and cropped at a random shift in [0, cell) per axis. Only the grids and shifts are drawn up
front (from ``np.random.default_rng(random_state)``); each batch's masks are made when the batch is
(the upsampling is two small matrix products), so memory does not grow with ``num_masks``.

Estimators of the same expected map: ``paper`` (the sum above), ``centred`` (the default: the sum
without the noise of the masks' uneven coverage) and ``regression`` (``MaskRegression``: the class
probability regressed on the masks, whose own covariance is known exactly; with ``keep_probability``
0.5 the masks come in complementary pairs; sample-efficient: fewer passes for the same noise).

``stop_reliability`` (regression only) stops drawing masks once the map is as stable as asked, as
LIME's stop rule does: the regression knows its own noise (the ridge fit's sandwich covariance, from
the residuals of the pairs' half-differences, carried to the pixels through the masks' covariance), so
each check (after 200 passes, then 25 % more each time) compares 1 - noise / the map's spatial variance,
about the correlation of two such maps from different masks, with the target; ``num_masks`` is the
most drawn. On EfficientNet-Lite0 and chelsea the estimate is within 0.02 of the measured agreement of
independent runs at 250 to 1,000 passes (0.84 / 0.93 / 0.965 estimated; 0.86 / 0.94 / 0.96 measured).

The blend is written in the model's input space: preprocessing is affine per pixel, so blending the
normalised image and fill is exactly the normalised blend of the pixels. ``mask_value="auto"`` is the
image's mean colour (occlusion's default); the paper's code blends toward the input zero, which for
mean-subtracting preprocessing is ``mask_value=`` the preprocessing's mean.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ._common import MapMethod, fill_colour
from ..runtime.perturb import BACKENDS, stream_probabilities
from ..errors import InvalidParameterError
from .registry import FORWARD_ONLY, BatchSize, Choice, Flag, Float, Int, Optional, PixelValue, Seed, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

ESTIMATORS = ("paper", "centred", "regression")
STOP_FIRST = 200  # passes before the first stop check (estimator="regression", stop_reliability), and
# at least as many as the regression's features: with fewer, the fit's residuals understate its noise
STOP_GROWTH = 1.25  # each stop check comes after 25 % more passes than the last


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of skimage's ``resize(order=1, mode="reflect", anti_aliasing=False)``
    along one axis: half-pixel centres, mirrored about the edge pixels outside them."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.abs(src)  # mirror below the first centre
    src = np.where(src > n_in - 1, 2 * (n_in - 1) - src, src)  # and above the last
    low = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - low
    out = np.zeros((n_out, n_in))
    out[np.arange(n_out), low] = 1 - frac
    out[np.arange(n_out), low + 1] = frac
    return out.astype(np.float32)


class RiseMasks:
    """The masks of one RISE run: random grids and shifts drawn once, full-size masks made on demand
    for any span of them (``masks(start, stop)``), always the same for the same span.

    ``antithetic``: masks come in pairs, each drawn mask followed by its complement ``1 - M`` (which,
    at ``keep_probability`` 0.5, is a RISE mask as likely as ``M``): ``ceil(num_masks / 2)`` grids and
    shifts are drawn, and mask ``i`` is grid ``i // 2``, complemented when ``i`` is odd."""

    def __init__(self, size: tuple[int, int], num_masks: int, grid_size: int, keep_probability: float,
                 random_state=None, antithetic: bool = False):
        rng = np.random.default_rng(random_state)
        self.size, self.num_masks, self.keep_probability = tuple(size), num_masks, keep_probability
        self.grid_size, self.antithetic = grid_size, antithetic
        drawn = (num_masks + 1) // 2 if antithetic else num_masks
        self.cells = [math.ceil(s / grid_size) for s in size]
        # bool grids, drawn in chunks (the same stream as one draw): N x g x g bytes, no N-sized float temp
        chunks = [(min(65536, drawn - i), grid_size, grid_size) for i in range(0, drawn, 65536)]
        self.grids = np.concatenate([rng.random(shape) < keep_probability for shape in chunks])
        self.shifts = np.stack([rng.integers(0, c, drawn) for c in self.cells], axis=1)
        self._rows, self._cols = (_upsample_matrix(grid_size, (grid_size + 1) * c) for c in self.cells)

    def masks(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, H, W) float32 masks ``start .. stop-1`` in [0, 1]: upsample-then-crop is a crop of the
        interpolation matrices, so each mask is rows @ grid @ cols.T."""
        stop = self.num_masks if stop is None else stop
        drawn = np.arange(start, stop) // 2 if self.antithetic else slice(start, stop)
        (h, w), shifts = self.size, self.shifts[drawn]
        rows = self._rows[shifts[:, :1] + np.arange(h)]  # (n, H, g)
        cols = self._cols[shifts[:, 1:] + np.arange(w)]  # (n, W, g)
        out = rows @ self.grids[drawn].astype(np.float32) @ cols.transpose(0, 2, 1)
        if self.antithetic:
            odd = np.arange(start, stop) % 2 == 1
            out[odd] = 1 - out[odd]
        return out

    def covariance_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, H) and (W, W) matrices whose Kronecker product, times p (1 - p), is the covariance of
        the masks' pixels: a mask is rows_s @ grid @ cols_s.T with independent Bernoulli(p) cells and
        a shift s uniform per axis, so Cov(M(y, x), M(y', x')) = p (1 - p) E_s[rows_s[y] . rows_s[y']]
        E_s[cols_s[x] . cols_s[x']] (a complement has the same covariance)."""
        def factor(matrix, n, cell):
            crops = np.stack([matrix[s:s + n] for s in range(cell)]).astype(np.float64)  # (cell, n, g)
            return np.einsum("sig,sjg->ij", crops, crops) / cell
        return factor(self._rows, self.size[0], self.cells[0]), factor(self._cols, self.size[1], self.cells[1])


def rise_masks(net: Classifier, num_masks: int = 2000, grid_size: int = 7, keep_probability: float = 0.5,
               random_state=None, estimator: str = "centred") -> RiseMasks:
    """The masks ``rise`` uses with the same arguments and seed (``.masks()`` gives them all: keep
    ``num_masks`` small, they take H x W x 4 bytes each)."""
    antithetic = estimator == "regression" and keep_probability == 0.5
    return RiseMasks(net.input.size, num_masks, grid_size, keep_probability, random_state, antithetic)


@method("rise", kind=FORWARD_ONLY,
        options=dict(num_masks=Int(1, 10_000_000, help="random masks (forward passes); the map's noise "
                                                       "falls as 1 / sqrt(num_masks)"),
                     grid_size=Int(1, 1024, help="cells per side of the random grid: the scale of the "
                                                 "regions the map resolves"),
                     keep_probability=Float(0.0, 1.0, min_inclusive=False,
                                            help="probability that a grid cell is kept"),
                     mask_value=PixelValue(help="the colour masked pixels blend toward ('auto': the "
                                                "image's mean colour)"),
                     estimator=Choice(ESTIMATORS, help="'centred': the paper's expected map without the chance "
                                                       "coverage of each pixel by the masks (far less noise); "
                                                       "'paper': sum_i P_i M_i / (N p) exactly (DIANNA's); "
                                                       "'regression': the same expected map, by regression on "
                                                       "the masks (complementary pairs at p = 0.5): the "
                                                       "centred sum's noise in 2 to 5 times fewer passes"),
                     stop_reliability=Optional(Float(0.0, 1.0, min_inclusive=False),
                                               help="estimator='regression' only: stop drawing masks once the "
                                                    "map's estimated reliability (the expected correlation of "
                                                    "two such maps from different masks) reaches this for "
                                                    "every label; num_masks is the most drawn"),
                     batch_size=BatchSize(), backend=Choice(BACKENDS),
                     random_state=Seed(help="seed of the masks (None: new masks on every call)"),
                     verbose=Flag()),
        answers="which regions, when kept while random others are hidden, keep the class probability high",
        returns="maps at the image's size, in probability units (the mean class probability of the "
                "masked images that keep each pixel)",
        cost="num_masks forward passes, or fewer where stop_reliability stops earlier (all labels, and all "
             "images of a batch, share the masks)",
        reference="the paper's formula (estimator='paper') and the centred one on the same masks, computed "
                  "independently (tests/test_rise.py); "
                  "masks equal to eclique/RISE generate_masks' skimage upsampling", order=60)
def rise(net: Classifier, image, label, *, num_masks=2000, grid_size=7, keep_probability=0.5, mask_value="auto",
         estimator="centred", stop_reliability=None, batch_size="auto", backend="onnxruntime", random_state=None,
         verbose=True):
    """RISE map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return Rise(net, num_masks=num_masks, grid_size=grid_size, keep_probability=keep_probability,
                mask_value=mask_value, estimator=estimator, stop_reliability=stop_reliability,
                batch_size=batch_size, backend=backend, random_state=random_state, verbose=verbose)(image, label)


class Rise(MapMethod):
    where = "rise"

    def __init__(self, net: Classifier, **options):
        super().__init__(net, **options)
        if self.stop_reliability is not None and self.estimator != "regression":
            raise InvalidParameterError(f"{self.where}: stop_reliability needs estimator='regression' (the others "
                                        f"have no noise estimate); got estimator={self.estimator!r}.")
        self.batch = net.resolve_batch_size(self.batch_size, self.where, self.backend)
        self.passes = []  # forward passes drawn for each image of the last call

    def setup(self, pixels, indices):  # one set of masks for all the images
        self.masks = rise_masks(self.net, self.num_masks, self.grid_size, self.keep_probability, self.random_state,
                                self.estimator)

    def explain(self, pixels, indices):
        small = self.net.fit_pixels(pixels)
        maps, passes = _saliency(self.net, small, fill_colour(self.mask_value, small), self.masks, indices,
                                 self.batch, self.backend, self.verbose, self.estimator, self.stop_reliability)
        self.passes.append(passes)
        return maps


def _unrounded_input(net: Classifier, pixels: np.ndarray) -> np.ndarray:
    """The model input of N x H x W x C pixels as float32, before a uint8 input's rounding: blends of
    image and fill are made here and rounded once, as the blended pixels would be."""
    if net.input.dtype != np.uint8:
        return net.to_model_input(pixels.astype(np.float32)).astype(np.float32)
    return net.preprocessing.normalise(pixels.astype(np.float32), channels_first=net.input.layout == "NCHW")


def _saliency(net: Classifier, small, fill, masks: RiseMasks, indices, batch, backend, verbose,
              estimator: str = "paper", stop_reliability: float | None = None) -> tuple[np.ndarray, int]:
    """(K, h, w) RISE map at the network's size for one network-size image, and the forward passes it
    drew. ``centred``: the paper's sum minus mean(P) x (how often each pixel was kept) / (N p), plus
    mean(P): the same expectation, without the noise of the masks' uneven coverage (which the paper's
    sum carries, weighted by mean(P)); ``regression``: ``MaskRegression``, stopped at the first check
    (after ``STOP_FIRST`` passes or as many as its features, then 25 % more each time) where every
    label's ``reliability()`` reaches ``stop_reliability``: the map is then that of the masks drawn so
    far (a prefix of the ``num_masks`` run's)."""
    channels_first = net.input.layout == "NCHW"
    dtype = net.input.dtype
    base, fill_input = (_unrounded_input(net, p) for p in (small[None], np.broadcast_to(fill, small.shape)[None]))
    diff = base - fill_input

    made = {}  # each batch's masks, from make_batch (run in the streams' threads) to the sum below

    def make_batch(start, stop):  # fill + M * (image - fill), in model input
        m = made[start] = masks.masks(start, stop)
        x = fill_input + (m[:, None] if channels_first else m[..., None]) * diff
        if dtype == np.uint8:
            return np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return x.astype(dtype, copy=False)

    h, w = net.input.size
    centred = estimator == "centred"
    regression = MaskRegression(masks, len(indices)) if estimator == "regression" else None
    check = max(STOP_FIRST, regression.features) if stop_reliability is not None else masks.num_masks + 1
    total = np.zeros((len(indices), h * w), np.float64)
    coverage = np.zeros(h * w, np.float64)
    probability = np.zeros(len(indices), np.float64)
    stream = stream_probabilities(net, make_batch, masks.num_masks, batch_size=batch, backend=backend,
                                  verbose=verbose, desc="RISE")
    try:
        for start, stop, probs in stream:
            # at most two batches per stream are in flight, so ``made`` holds a few batches' masks at a time
            m = made.pop(start)
            if regression is not None:
                regression.add(m, probs[:, indices])
                if stop >= check and stop < masks.num_masks:
                    if (regression.reliability() >= stop_reliability).all():
                        break
                    check = max(stop + 1, int(math.ceil(stop * STOP_GROWTH)))
                continue
            m = m.reshape(stop - start, -1)
            total += probs[:, indices].T @ m  # float32 per batch
            if centred:
                coverage += m.sum(axis=0)
                probability += probs[:, indices].sum(axis=0)
    finally:
        stream.close()  # a stop leaves batches in flight: the streams' pool cancels them
    if regression is not None:
        return regression.maps(), regression.n
    scale = masks.num_masks * masks.keep_probability
    if centred:
        mean = probability[:, None] / masks.num_masks
        total = total - mean * coverage[None] + mean * scale
    return (total / scale).reshape(len(indices), h, w).astype(np.float32), masks.num_masks


def _area_matrix(n: int, r: int) -> np.ndarray:
    """(r, n): the means of r contiguous, near-equal spans of n."""
    out = np.zeros((r, n))
    for i in range(r):
        out[i, i * n // r:(i + 1) * n // r] = 1
    return out / out.sum(axis=1, keepdims=True)


class MaskRegression:
    """RISE's map, ``E[P | pixel kept] = mean P + Cov(P, M(x)) / p``, with the covariance estimated by
    regression on the masks instead of by the Monte Carlo sum: far less noise for the same passes.

    The class probability is regressed (ridge) on each mask's ``2 g x 2 g`` block means (g: grid_size;
    features that span the masks' variation up to blocks of half a cell), giving the score's linear
    response ``B`` to each block; the covariance of the score with the mask at a pixel is then that
    response carried through the masks' own covariance, known exactly (``RiseMasks.covariance_factors``):
    ``Cov(P, M) = p (1 - p) Kr B Kc.T``. Only the forward passes are random, not the masks' covariance,
    and the part of the score no mask block predicts (whose covariance with the masks is zero) adds no
    noise. With ``keep_probability`` 0.5 the masks come in complementary pairs (``antithetic``): the
    pair's difference removes every even part of the score's response (interactions of two regions)
    from the regression. The ridge strength is chosen per class by generalised cross-validation (Golub,
    Heath & Wahba 1979) from the running sums, so nothing but (D x D) and (D x K) sums is kept (D =
    (2g)^2), whatever ``num_masks``."""

    LAMBDAS = np.logspace(-4, 1, 26)  # ridge strengths, relative to the mean eigenvalue of the features

    def __init__(self, masks: RiseMasks, k: int):
        (h, w), g = masks.size, masks.grid_size
        self.masks, self.k = masks, k
        self.rows, self.cols = _area_matrix(h, min(2 * g, h)), _area_matrix(w, min(2 * g, w))
        self.features = d = len(self.rows) * len(self.cols)
        self.n = 0
        self.ff, self.f = np.zeros((d, d)), np.zeros(d)
        self.fy, self.y, self.yy = np.zeros((d, k)), np.zeros(k), np.zeros(k)
        # complementary pairs: the sum of their squared half-differences (the score's odd part), for the noise
        self.pairs, self.dd, self._pending = 0, np.zeros(k), None
        self._factors = None

    def add(self, m: np.ndarray, y: np.ndarray) -> None:
        """One batch: (n, H, W) masks and (n, K) probabilities, in the masks' order."""
        phi = (self.rows @ m.astype(np.float64) @ self.cols.T).reshape(len(m), -1)
        y = y.astype(np.float64)
        self.n += len(m)
        self.ff += phi.T @ phi
        self.f += phi.sum(axis=0)
        self.fy += phi.T @ y
        self.y += y.sum(axis=0)
        self.yy += (y * y).sum(axis=0)
        if self.masks.antithetic:  # masks 2i and 2i + 1 are a pair; a batch may end between them
            ys = y if self._pending is None else np.concatenate([self._pending[None], y])
            whole = len(ys) // 2 * 2
            d = (ys[0:whole:2] - ys[1:whole:2]) / 2
            self.pairs += len(d)
            self.dd += (d * d).sum(axis=0)
            self._pending = ys[whole] if len(ys) > whole else None

    def _fit(self):
        """The ridge fit in the features' eigenbasis: eigenvalues (D,), eigenvectors (D, D), coefficients
        (D, K), each class's strength (K,) by generalised cross-validation, the cross products (D, K) and
        the residual sum of squares (K,)."""
        n = self.n
        gram = self.ff - np.outer(self.f, self.f) / n
        cross = self.fy - np.outer(self.f, self.y) / n
        yy = self.yy - self.y ** 2 / n
        values, vectors = np.linalg.eigh(gram)
        values = np.clip(values, 0, None)
        projected = vectors.T @ cross  # (D, K)
        scale = values.mean() if values.mean() > 0 else 1.0
        best, score = np.zeros_like(cross), np.full(self.k, np.inf)
        chosen, residual = np.zeros(self.k), np.zeros(self.k)
        for lam in self.LAMBDAS * scale:
            shrink = values / (values + lam)
            coef = projected / (values + lam)[:, None]  # in the eigenbasis
            # residual sum of squares: yy - 2 coef.cross + coef.G.coef, in the eigenbasis
            rss = yy - 2 * (coef * projected).sum(axis=0) + (coef ** 2 * values[:, None]).sum(axis=0)
            dof = shrink.sum()
            gcv = np.maximum(rss, 0) / max(n * (1 - dof / n) ** 2, 1e-12) if dof < n else np.full(self.k, np.inf)
            better = gcv < score
            score = np.where(better, gcv, score)
            best[:, better] = coef[:, better]
            chosen[better], residual[better] = lam, np.maximum(rss, 0)[better]
        return values, vectors, best, chosen, projected, residual

    def coefficients(self) -> np.ndarray:
        """(D, K) ridge coefficients, each class's strength by generalised cross-validation."""
        values, vectors, best, *_ = self._fit()
        return vectors @ best

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        if self._factors is None:
            self._factors = self.masks.covariance_factors()
        return self._factors

    def maps(self, coefficients: np.ndarray | None = None) -> np.ndarray:
        """(K, H, W) float32: mean P + (1 - p) Kr B Kc.T per class (RISE's units)."""
        p = self.masks.keep_probability
        kr, kc = self.factors()
        coefficients = self.coefficients() if coefficients is None else coefficients
        beta = coefficients.T.reshape(self.k, len(self.rows), len(self.cols))
        response = self.rows.T @ beta @ self.cols  # (K, H, W): each block's coefficient spread over it
        maps = self.y[:, None, None] / self.n + (1 - p) * (kr @ response @ kc.T)
        return maps.astype(np.float32)

    def reliability(self) -> np.ndarray:
        """(K,) the maps' estimated reliability, 1 - (mean sampling variance of a pixel) / (the map's
        spatial variance): about the expected correlation of two maps from as many different masks (and
        the square of a map's correlation with the noise-free one). The coefficients' covariance is the
        ridge sandwich s2 (G + lam)^-1 G (G + lam)^-1, s2 the residual variance: of the pairs' half-
        differences (twice it) with complementary pairs, whose even part cancels in the fit, else of
        the fit; it is carried to the pixels through the map's linear map, L = (1 - p) (Kr R.T) (x)
        (Kc C.T), whose L.T L is a Kronecker product of two small matrices."""
        values, vectors, best, lam, projected, residual = self._fit()
        dof = (values[:, None] / (values[:, None] + lam)).sum(axis=0)
        if self.masks.antithetic and self.pairs > 0:
            # sum over pairs of (d - u.beta)^2 = sum d^2 - beta.cross + beta.G.beta / 2 (u = phi - 1/2)
            rss = self.dd - (best * projected).sum(axis=0) + 0.5 * (best ** 2 * values[:, None]).sum(axis=0)
            s2 = 2 * np.maximum(rss, 0) / np.maximum(self.pairs - dof, 1)
        else:
            s2 = residual / np.maximum(self.n - dof, 1)
        p = self.masks.keep_probability
        kr, kc = self.factors()
        a, c = kr @ self.rows.T, kc @ self.cols.T
        ltl = np.kron(a.T @ a, c.T @ c)
        q = np.einsum("ij,ik,kj->j", vectors, ltl, vectors)  # diag(V.T LtL V)
        h, w = self.masks.size
        noise = (1 - p) ** 2 * s2 * (q[:, None] * values[:, None] / (values[:, None] + lam) ** 2).sum(axis=0) / (h * w)
        spread = self.maps(vectors @ best).reshape(self.k, -1).var(axis=1)
        return np.where(spread > 0, 1 - noise / np.maximum(spread, 1e-300), 0.0)
