"""The inverted file (IVF): the lists a gated query walks on a large database, and the
approximate `--all`, with FAISS's k-means.

k-means (FAISS, spherical) puts n_lists centroids among a sample of the matrix's rows,
centred on the database's mean feature when it is trained (cbir.centring: the space queries
rank in); every image is assigned to its nearest centroid, and the catalog keeps that list
number beside the image's row (so assignments are committed by the same transaction as the
image). A gated query orders the lists by their centroid's cosine to its centred probe and
takes their rows until it has its candidate budget; `--all` takes the `nprobe` nearest
lists. The centroids, the mean they are centred on and `fit` are a plain array file,
ivf-<generation>.npz; the catalog says which generation is in use. They are trained once
the database holds IVF_MIN_IMAGES images and again whenever it has grown RETRAIN_GROWTH-fold
since, so that the lists stay balanced as it grows.

A list must fit what it holds: a small kind among a large one (37 photos among 40k fashion
images), spread over lists of the other kind, is not found by a query that walks the lists
nearest to it. So a row that fits its nearest list worse than 95 % of the training sample
fit theirs (cosine below `fit`) gets a list of its own kind: the rows that fit none are
clustered among themselves into lists NEW_LIST_SHARE times smaller than the trained ones.

And lists trained on what the database held then do not know what it gets later: photos
of a new kind added to 60k Fashion-MNIST were mostly not found (32 % of the exhaustive mAP).
So an image added after the lists were trained is not put in a list at once: it joins the
new rows (list NEW_ROWS), which every gated query searches whole, as vector databases search
their growing segment. When they pass new_rows_limit(n) (1 % of the images, 256 to 4096),
the writer covers them (InvertedFile.cover) in the same way: each goes to its nearest list if
it fits it, and the rest get lists of their own, appended to the file. A gated query searches
its lists plus at most new_rows_limit(n) rows, whatever the order images arrived in; a cover
costs k-means among the new rows only (bench/bench_growth.py, docs/quality.md).
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
NEW_ROWS = -1  # the list of images added since the lists last covered them: always searched
NEW_ROWS_SHARE = 0.01  # new rows are covered once they pass this share of the images ...
NEW_ROWS_MIN, NEW_ROWS_MAX = 256, 4096  # ... but never below / above this many
FIT_PERCENTILE = 5  # a row fits a list if its cosine to it is above that of 5 % of trained rows
NEW_LIST_SHARE = 4  # lists of rows that fit none are this many times smaller than trained ones:
# k-means with a few centroids lumps a small new kind (37 photos) in with a large one

IVF_FILES = GenerationFiles("ivf-", ".npz")


def n_lists_for(n_images: int) -> int:
    """About sqrt(n) lists (FAISS's guideline for IVF), at least 64 and at most n / 4."""
    return max(1, min(max(64, math.isqrt(n_images)), n_images // 4))


def new_rows_limit(n_images: int) -> int:
    """How many new rows a database of n_images images keeps before covering them."""
    return min(max(NEW_ROWS_MIN, int(NEW_ROWS_SHARE * n_images)), NEW_ROWS_MAX)


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
    unit-norm again; `fit`: the cosine to its list below which a new row is put in a list of
    its own kind (see cover)."""

    centroids: npt.NDArray[np.float32]
    mean: npt.NDArray[np.float32]
    fit: float = -1.0

    @classmethod
    def train(
        cls, sample: npt.NDArray[np.float32], mean: npt.NDArray[np.float32], n_lists: int,
        seed: int = 1234,
    ) -> InvertedFile:
        """From stored rows `sample` (m, d) and the database's mean (d,)."""
        mean = np.asarray(mean, np.float32)
        probes = normalise(sample - mean)
        centroids = kmeans(probes, n_lists, seed)
        fits, _ = _best(probes, centroids)
        return cls(centroids, mean, float(np.percentile(fits, FIT_PERCENTILE)))

    def __len__(self) -> int:
        return len(self.centroids)

    def probe(self, feature: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A unit-norm feature (d,) or rows (n, d) in the centroids' space."""
        return normalise(np.asarray(feature, np.float32) - self.mean)

    def assign(
        self, features: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(cosines, lists), each (n,): each stored row of `features` (n, d), its nearest
        centroid and its cosine to it (below `fit`: the row fits no list)."""
        if len(features) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return _best(self.probe(features), self.centroids)

    def cover(
        self, features: npt.NDArray[np.float32], list_size: int, seed: int = 1234
    ) -> tuple[InvertedFile, npt.NDArray[np.int64]]:
        """(this file with lists added, (n,) the list of each stored row of `features` (n, d)):
        a row that fits its nearest list (cosine >= fit) goes there; the others get lists of
        their own (with_lists_for)."""
        scores, lists = self.assign(features)
        unfit = np.flatnonzero(scores < self.fit)
        if len(unfit) == 0:
            return self, lists
        grown, lists[unfit] = self.with_lists_for(features[unfit], list_size, seed)
        return grown, lists

    def with_lists_for(
        self, features: npt.NDArray[np.float32], list_size: int, seed: int = 1234
    ) -> tuple[InvertedFile, npt.NDArray[np.int64]]:
        """(this file with new lists for the stored rows `features` (m, d), (m,) their lists):
        k-means among those rows only (the cost is in proportion to them, not to the
        database), one list per list_size / NEW_LIST_SHARE of them."""
        probes = self.probe(features)
        size = max(1.0, list_size / NEW_LIST_SHARE)
        added = kmeans(probes, max(1, min(len(probes), round(len(probes) / size))), seed)
        grown = InvertedFile(np.concatenate([self.centroids, added]), self.mean, self.fit)
        return grown, len(self) + _best(probes, added)[1]

    def nearest(self, probes: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
        """(n, k) the k lists whose centroids are most similar to `probes` (n, d) or (d,)
        (already in the centroids' space: see probe), best first."""
        return _search(probes, self.centroids, k)[1]

    def order(self, probe: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """(L,) every list, by its centroid's cosine to `probe` (d,), best first."""
        return np.argsort(-(self.centroids @ np.asarray(probe, np.float32)), kind="stable")

    def write(self, path: Path) -> None:
        write_atomic(path, npz_writer(centroids=np.asarray(self.centroids, np.float32),
                                      mean=np.asarray(self.mean, np.float32),
                                      fit=np.float32(self.fit)))  # fmt: skip

    @classmethod
    def read(cls, path: Path, dim: int) -> InvertedFile:
        """The inverted file at `path`, validated. Raises FileNotFoundError, DatabaseError."""
        arrays = load_npz(path, ("centroids", "mean"), optional=("fit",))
        centroids, mean = arrays["centroids"], arrays["mean"]
        fit = arrays.get("fit", np.float32(-1.0))  # a file of format 7 before fit: all fit
        if centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != dim or (
            not 1 <= len(centroids) <= 1 << 20
        ) or not np.isfinite(centroids).all():  # fmt: skip
            raise damaged(path, f"its centroids are not (n, {dim}) finite float32")
        if mean.dtype != np.float32 or mean.shape != (dim,) or not np.isfinite(mean).all():
            raise damaged(path, f"its mean is not ({dim},) finite float32")
        if fit.dtype != np.float32 or fit.shape != () or not -1.0 <= float(fit) <= 1.0:
            raise damaged(path, "its fit is not a float32 cosine")
        return cls(centroids, mean, float(fit))


def _search(
    probes: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(cosines, lists), each (n, k), of the k centroids (L, d) nearest each probe (n, d)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    probes = np.ascontiguousarray(probes, np.float32).reshape(-1, index.d)
    scores, lists = index.search(probes, min(k, len(centroids)))
    return scores, lists.astype(np.int64)


def _best(
    probes: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(cosines, lists), each (n,), of the centroid nearest each probe (n, d)."""
    scores, lists = _search(probes, centroids, 1)
    return scores[:, 0], lists[:, 0]
