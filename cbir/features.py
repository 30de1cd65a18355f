"""Descriptor post-processing that needs no model: PCA(-whitening) and query expansion. Numpy only.

The PCA is learned on a database's own descriptors (no labels): centre, rotate onto the principal
axes, optionally keep only the first `dim` axes, scale axis i by variance_i ** -power, and
L2-normalise again. power 0.5 is classic PCA-whitening (every axis gets unit variance, so
frequent, correlated directions weigh less); power 0 only centres, rotates and reduces. The
learned mean (d,) and projection (dim, d) are plain float32 arrays, so a database can store them
and apply them to its queries.

Query expansion (average query expansion, AQE): average the query with its top-m results,
renormalise, search again; results that agree with each other pull the query towards them.
How the two searches make one ranking is cbir.ranking.rank_by's (every front end's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DEFAULT_SHRINKAGE = 0.1
CHUNK = 65536  # rows per step when the covariance is summed


@dataclass(frozen=True)
class Whitening:
    """y = normalise(projection @ (x - mean)). mean: (d,) float32; projection: (dim, d) float32."""

    mean: npt.NDArray[np.float32]
    projection: npt.NDArray[np.float32]


def learn_whitening(
    features: npt.NDArray[np.float32],
    dim: int | None = None,
    power: float = 0.5,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> Whitening:
    """PCA of `features` (n, d) keeping `dim` axes (None: every axis with variance), each axis
    scaled by (variance + shrinkage * mean variance) ** -power.

    A database of n images has at most n - 1 axes with variance, and the last of them are noise:
    `shrinkage` damps them rather than blowing them up when power > 0. Memory stays O(d^2) for
    any n: the covariance is summed over chunks of rows.
    """
    n, d = features.shape
    if n < 2:
        raise ValueError("PCA needs at least 2 descriptors")
    mean = np.zeros(d, np.float64)
    for start in range(0, n, CHUNK):
        mean += np.sum(features[start : start + CHUNK], axis=0, dtype=np.float64)
    mean /= n
    scatter = np.zeros((d, d), np.float64)
    for start in range(0, n, CHUNK):
        centred = np.asarray(features[start : start + CHUNK], np.float64) - mean
        scatter += centred.T @ centred
    variances, axes = np.linalg.eigh(scatter / (n - 1))  # ascending; axes in columns
    variances, axes = variances[::-1], axes[:, ::-1].T
    rank = int(np.sum(variances > variances[0] * 1e-10))
    keep = rank if dim is None else min(dim, rank)
    variances, axes = variances[:keep], axes[:keep]
    scale = (variances + shrinkage * variances.mean()) ** -power
    return Whitening(mean.astype(np.float32), (axes * scale[:, None]).astype(np.float32))


def apply_whitening(
    whitening: Whitening, features: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """features: (n, d) or (d,) -> (n, dim) or (dim,), rows L2-normalised."""
    projected = (np.asarray(features, np.float32) - whitening.mean) @ whitening.projection.T
    return normalise(projected)


def expand_query(
    query: npt.NDArray[np.float32],
    top_rows: npt.NDArray[np.float32],
    top_scores: npt.NDArray[np.float32] | None = None,
    alpha: float = 0.0,
) -> npt.NDArray[np.float32]:
    """The expanded query (d,): the query averaged with its top results, renormalised.

    query: (d,) unit-norm; top_rows: (m, d) the first search's best m rows, best first.
    alpha > 0 weighs each row by its cosine score to the power alpha (alpha-QE), so a weak m-th
    result counts less; the query itself always has weight 1.
    """
    if len(top_rows) == 0:
        return np.asarray(query, np.float32)
    weights = np.ones(len(top_rows), np.float32)
    if alpha > 0 and top_scores is not None:
        weights = np.maximum(np.asarray(top_scores, np.float32), 0.0) ** alpha
    expanded = np.asarray(query, np.float32) + weights @ np.asarray(top_rows, np.float32)
    return normalise(expanded)


def normalise(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """L2-normalise the last axis of (n, d) or (d,); zero rows stay zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
