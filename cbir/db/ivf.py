"""The inverted file (IVF) over the search matrix: approximate `--all` search on large
databases, with FAISS's k-means.

k-means (FAISS, spherical) puts n_lists centroids among a sample of the matrix's rows; every
image is assigned to its nearest centroid, and the catalog keeps that list number beside the
image's row (so assignments are committed by the same transaction as the image). An
exhaustive query then compares its feature with the centroids, takes the rows of the
`nprobe` nearest lists from the catalog and ranks only those: a few percent of the rows.
The centroids are a plain array in ivf-<generation>.npz; the catalog says which generation is
in use. They are trained once the database holds IVF_MIN_IMAGES images and again whenever it
has grown RETRAIN_GROWTH-fold since, so that the lists stay balanced as it grows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir.db.files import GenerationFiles, load_npz, npz_writer, write_atomic

IVF_MIN_IMAGES = 200_000  # below this an exact scan of the matrix is fast enough (bench/)
RETRAIN_GROWTH = 4
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
DEFAULT_PROBE_SHARE = 1 / 32  # lists searched per query; recall@10 in bench/bench_db.py


IVF_FILES = GenerationFiles("ivf-", ".npz")


def n_lists_for(n_images: int) -> int:
    """About sqrt(n) lists (FAISS's guideline for IVF), at least 64."""
    return max(64, int(math.sqrt(n_images)))


def train(sample: npt.NDArray[np.float32], n_lists: int, seed: int = 1234) -> np.ndarray:
    """(n_lists, d) float32 unit-norm centroids of `sample` (m, d) by spherical k-means."""
    import faiss

    kmeans = faiss.Kmeans(sample.shape[1], n_lists, niter=12, spherical=True, seed=seed,
                          verbose=False, min_points_per_centroid=1)  # fmt: skip
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(kmeans.centroids, np.float32)


def assign(centroids: npt.NDArray[np.float32], features: npt.NDArray[np.float32]) -> np.ndarray:
    """(n,) int64: the list of each of `features` (n, d), its most similar centroid."""
    if len(features) == 0:
        return np.zeros(0, np.int64)
    return nearest_lists(centroids, features, 1)[:, 0]


def nearest_lists(
    centroids: npt.NDArray[np.float32], features: npt.NDArray[np.float32], k: int
) -> npt.NDArray[np.int64]:
    """(n, k) the k lists most similar to each of `features` (n, d), best first."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    _, lists = index.search(np.ascontiguousarray(features, np.float32).reshape(-1, index.d), k)
    return lists.astype(np.int64)


def write_centroids(path: Path, centroids: npt.NDArray[np.float32]) -> None:
    write_atomic(path, npz_writer(centroids=np.asarray(centroids, np.float32)))


def read_centroids(path: Path, dim: int) -> npt.NDArray[np.float32]:
    """The centroids of an IVF file, validated. Raises FileNotFoundError, DatabaseError."""
    from cbir.db.files import damaged

    centroids = load_npz(path, ("centroids",))["centroids"]
    if centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != dim or (
        not 1 <= len(centroids) <= 1 << 20
    ) or not np.isfinite(centroids).all():  # fmt: skip
        raise damaged(path, f"its centroids are not (n, {dim}) finite float32")
    return centroids
