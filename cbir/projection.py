"""2-D maps of a database's feature space, for `cbir map`.

Features are read from the search matrix a block at a time and reduced by PCA to PCA_DIM axes
(the mean and covariance are accumulated block by block, so memory stays at n x PCA_DIM); then
t-SNE (openTSNE, FFT-accelerated) places the points in 2-D, or, above TSNE_MAX images or with
method "pca", the first two principal axes do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cbir.db import Database
from cbir.db.matrix import SCAN_BLOCK_ROWS
from cbir.errors import CbirError

PCA_DIM = 50
TSNE_MAX = 200_000  # above this, t-SNE takes more than a few minutes on 2 cores: PCA
METHODS = ("auto", "tsne", "pca")


@dataclass(frozen=True)
class Projection:
    ids: npt.NDArray[np.int64]  # (n,) image ids
    points: npt.NDArray[np.float32]  # (n, 2)
    method: str  # "tsne" or "pca"


def project(db: Database, method: str = "auto", seed: int = 0) -> Projection:
    """Every committed image of `db` placed in 2-D."""
    if method not in METHODS:
        raise CbirError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    with db.catalog.snapshot():
        ids, rows = db.catalog.all_rows()
        reduced = _pca(db, rows, PCA_DIM)
    n = len(ids)
    if method == "auto":
        method = "tsne" if 4 <= n <= TSNE_MAX else "pca"
    if method == "tsne" and n < 4:
        raise CbirError("t-SNE needs at least 4 images; use --method pca")
    if method == "pca" or n == 0:
        points = np.zeros((n, 2), np.float32)
        points[:, : min(2, reduced.shape[1])] = reduced[:, :2]
        return Projection(ids, points, "pca")
    from openTSNE import TSNE

    tsne = TSNE(perplexity=min(30.0, (n - 1) / 3), n_jobs=os.cpu_count() or 1,
                random_state=seed, verbose=False)  # fmt: skip
    points = np.asarray(tsne.fit(reduced.astype(np.float64)), np.float32)
    return Projection(ids, points, "tsne")


def _pca(db: Database, rows: npt.NDArray[np.int64], dim: int) -> npt.NDArray[np.float32]:
    """(n, <= dim) the matrix rows `rows` centred and rotated onto their principal axes."""
    matrix = db.matrix()
    d = matrix.dim
    if len(rows) == 0:
        return np.zeros((0, 0), np.float32)
    total = np.zeros(d)
    scatter = np.zeros((d, d))
    for start in range(0, len(rows), SCAN_BLOCK_ROWS):
        block = matrix.gather(rows[start : start + SCAN_BLOCK_ROWS]).astype(np.float64)
        total += block.sum(axis=0)
        scatter += block.T @ block
    mean = total / len(rows)
    covariance = scatter / len(rows) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    keep = min(dim, d, len(rows))
    axes = vectors[:, np.argsort(values)[::-1][:keep]].astype(np.float32)
    out = np.empty((len(rows), keep), np.float32)
    for start in range(0, len(rows), SCAN_BLOCK_ROWS):
        block = matrix.gather(rows[start : start + SCAN_BLOCK_ROWS])
        out[start : start + len(block)] = (block - mean.astype(np.float32)) @ axes
    return out


def spread_sample(points: npt.NDArray[np.float32], k: int) -> list[int]:
    """Up to k positions of points spread over the map: in a grid of about k cells over the
    points' extent, the point nearest each occupied cell's centre."""
    if len(points) == 0 or k <= 0:
        return []
    side = max(1, int(np.ceil(np.sqrt(k))))
    low, high = points.min(axis=0), points.max(axis=0)
    size = np.where(high > low, (high - low) / side, 1.0)
    cells = np.minimum(((points - low) / size).astype(int), side - 1)
    chosen: dict[tuple[int, int], int] = {}
    for i, cell in enumerate(map(tuple, cells.tolist())):
        centre = low + (np.array(cell) + 0.5) * size
        if cell not in chosen or (np.linalg.norm(points[i] - centre)
                                  < np.linalg.norm(points[chosen[cell]] - centre)):  # fmt: skip
            chosen[cell] = i
    return sorted(chosen.values())[:k]
