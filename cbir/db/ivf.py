"""The inverted file (IVF): the lists a gated query walks on a large database, and the
approximate `--all`, with FAISS's k-means.

k-means (FAISS, spherical) puts n_lists centroids among a sample of the matrix's rows,
centred on the database's mean feature when it is trained (cbir.centring: the space queries
rank in); every image is assigned to its nearest centroid, and the catalog keeps that list
number beside the image's row (so assignments are committed by the same transaction as the
image). A gated query orders the lists by their centroid's cosine to its centred probe and
takes their rows until it has its candidate budget; `--all` takes the `nprobe` nearest
lists. On evaldata among 70,000 Fashion-MNIST images this keeps 100.2 % of the exhaustive
mAP in 1.7 % of the rows, where whole categories kept 92.4 % in 2.8 % (docs/quality.md).

The centroids and the mean they are centred on are a plain array file, ivf-<generation>.npz;
the catalog says which generation is in use. They are trained once the database holds
IVF_MIN_IMAGES images and again whenever it has grown RETRAIN_GROWTH-fold since, so that the
lists stay balanced as it grows (lists trained at a quarter of the size still keep 99.8 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir.db.files import GenerationFiles, damaged, load_npz, npz_writer, write_atomic
from cbir.features import normalise

IVF_MIN_IMAGES = 10_000  # at 10k lists keep 99.7 %, whole categories 97.3 %; at 1k all 100 %
APPROXIMATE_ALL_MIN_IMAGES = 200_000  # `--all` is exact below (129 ms at 70k; bench/bench_db.py)
RETRAIN_GROWTH = 4
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
DEFAULT_PROBE_SHARE = 1 / 32  # lists an approximate --all searches; recall@10 in bench/bench_db.py

IVF_FILES = GenerationFiles("ivf-", ".npz")


def n_lists_for(n_images: int) -> int:
    """About sqrt(n) lists (FAISS's guideline for IVF), at least 64 and at most n / 4."""
    return max(1, min(max(64, math.isqrt(n_images)), n_images // 4))


def kmeans(sample: npt.NDArray[np.float32], n_lists: int, seed: int = 1234) -> np.ndarray:
    """(n_lists, d) float32 unit-norm centroids of `sample` (m, d) by spherical k-means."""
    import faiss

    model = faiss.Kmeans(sample.shape[1], n_lists, niter=12, spherical=True, seed=seed,
                         verbose=False, min_points_per_centroid=1)  # fmt: skip
    model.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(model.centroids, np.float32)


@dataclass(frozen=True)
class InvertedFile:
    """centroids (L, d) unit-norm, in the space of rows centred on `mean` (d,) and made
    unit-norm again."""

    centroids: npt.NDArray[np.float32]
    mean: npt.NDArray[np.float32]

    @classmethod
    def train(
        cls, sample: npt.NDArray[np.float32], mean: npt.NDArray[np.float32], n_lists: int,
        seed: int = 1234,
    ) -> InvertedFile:
        """From stored rows `sample` (m, d) and the database's mean (d,)."""
        mean = np.asarray(mean, np.float32)
        return cls(kmeans(normalise(sample - mean), n_lists, seed), mean)

    def __len__(self) -> int:
        return len(self.centroids)

    def probe(self, feature: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A unit-norm feature (d,) or rows (n, d) in the centroids' space."""
        return normalise(np.asarray(feature, np.float32) - self.mean)

    def assign(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """(n,) the list of each stored row of `features` (n, d): its nearest centroid."""
        if len(features) == 0:
            return np.zeros(0, np.int64)
        return self.nearest(self.probe(features), 1)[:, 0]

    def nearest(self, probes: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
        """(n, k) the k lists whose centroids are most similar to `probes` (n, d) or (d,)
        (already in the centroids' space: see probe), best first."""
        import faiss

        index = faiss.IndexFlatIP(self.centroids.shape[1])
        index.add(np.ascontiguousarray(self.centroids, np.float32))
        probes = np.ascontiguousarray(probes, np.float32).reshape(-1, index.d)
        _, lists = index.search(probes, min(k, len(self)))
        return lists.astype(np.int64)

    def order(self, probe: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """(L,) every list, by its centroid's cosine to `probe` (d,), best first."""
        return np.argsort(-(self.centroids @ np.asarray(probe, np.float32)), kind="stable")

    def write(self, path: Path) -> None:
        write_atomic(path, npz_writer(centroids=np.asarray(self.centroids, np.float32),
                                      mean=np.asarray(self.mean, np.float32)))  # fmt: skip

    @classmethod
    def read(cls, path: Path, dim: int) -> InvertedFile:
        """The inverted file at `path`, validated. Raises FileNotFoundError, DatabaseError."""
        arrays = load_npz(path, ("centroids", "mean"))
        centroids, mean = arrays["centroids"], arrays["mean"]
        if centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != dim or (
            not 1 <= len(centroids) <= 1 << 20
        ) or not np.isfinite(centroids).all():  # fmt: skip
            raise damaged(path, f"its centroids are not (n, {dim}) finite float32")
        if mean.dtype != np.float32 or mean.shape != (dim,) or not np.isfinite(mean).all():
            raise damaged(path, f"its mean is not ({dim},) finite float32")
        return cls(centroids, mean)
