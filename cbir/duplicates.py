"""`cbir duplicates`: groups of identical content and of near-duplicates, without comparing
every image with every other.

Identical content is known already: one image, several source paths. Near-duplicates are
pairs of images whose features have a cosine >= the threshold, found by FAISS range search:
exact over the float16 matrix up to EXACT_LIMIT images, else through an inverted file of
about 4 sqrt(n) lists, each image compared only with the rows of its NPROBE nearest lists
(about 1 % of the database at 60k); only each image's NEIGHBOURS nearest are kept. Pairs are
joined into groups (connected components); a group's score is the lowest cosine between any
two of its images (for groups over EXACT_GROUP images: of its weakest link).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cbir.db import Database, ivf
from cbir.db.matrix import SCAN_BLOCK_ROWS
from cbir.ranking import Float16Rows

# Pairs of near-duplicate variants vs distinct photos (testdata/near_duplicates among photos/,
# efficientnet_lite0): see bench/bench_duplicates.py and the README.
DEFAULT_THRESHOLD = 0.8
EXACT_LIMIT = 20_000
NPROBE = 8
QUERY_BLOCK = 2048
NEIGHBOURS = 32  # pairs kept per image: Fashion-MNIST has hundreds of images alike at 0.8
EXACT_GROUP = 2000  # larger groups are scored by their weakest link, not by all their pairs


@dataclass(frozen=True)
class DuplicateGroup:
    ids: tuple[int, ...]  # the images, by id
    paths: tuple[str, ...]  # every source path of their content, sorted
    score: float  # the lowest cosine between two of its images (1.0: identical content)


def find_duplicates(db: Database, threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Every group of two or more paths whose images are identical or near-duplicates, by
    lowest score then by first path."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    with db.catalog.snapshot():  # read one committed state; compute after, not blocking writers
        ids, rows = db.catalog.all_rows()
        matrix = db.matrix()
        codes = Float16Rows(matrix.dim)
        view = codes.buffer(len(rows))
        for start in range(0, len(rows), SCAN_BLOCK_ROWS):
            block = rows[start : start + SCAN_BLOCK_ROWS]
            matrix.gather_codes(block, view[start : start + len(block)])
        several_paths = db.catalog.images_with_several_paths()
    first, second, link_scores = similar_pairs(codes, threshold)
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)),
                       shape=(len(ids), len(ids)))  # fmt: skip
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    wanted = (sizes[labels] > 1) | np.isin(ids, np.array(sorted(several_paths), np.int64))
    by_label: dict[int, list[int]] = {}
    for position in np.flatnonzero(wanted).tolist():
        by_label.setdefault(int(labels[position]), []).append(position)
    groups = []
    weakest = np.full(len(ids), 1.0, np.float32)  # per component: its weakest link
    np.minimum.at(weakest, labels[first], link_scores)
    for label, members in by_label.items():
        paths = sorted(p for m in members for p in db.paths_of(int(ids[m])))
        if len(paths) < 2:  # removed since the snapshot
            continue
        if len(members) <= EXACT_GROUP:
            features = codes.rows(np.array(members, np.int64))
            cosines = (features @ features.T)[np.triu_indices(len(members), 1)]
            score = min(float(cosines.min()), 1.0) if len(cosines) else 1.0
        else:
            score = float(weakest[label])
        groups.append(DuplicateGroup(tuple(int(ids[m]) for m in members), tuple(paths), score))
    return sorted(groups, key=lambda g: (g.score, g.paths[0]))


def similar_pairs(
    codes: Float16Rows, threshold: float
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """(i, j, cosine) arrays, i < j: positions of rows (n, d) whose cosine is >= threshold,
    among each row's NEIGHBOURS nearest (so memory stays bounded where many images are
    alike)."""
    import faiss

    n = len(codes)
    if n < 2:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    if n <= EXACT_LIMIT:
        index = codes.index
    else:
        n_lists = max(64, int(4 * math.sqrt(n)))
        chosen = np.sort(np.random.default_rng(0).choice(n, min(n, 40 * n_lists), replace=False))
        quantizer = faiss.IndexFlatIP(codes.dim)
        quantizer.add(ivf.kmeans(codes.rows(chosen), n_lists))
        index = faiss.IndexIVFScalarQuantizer(quantizer, codes.dim, n_lists,
                                              faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.is_trained = True
        index.nprobe = NPROBE
        for start in range(0, n, SCAN_BLOCK_ROWS):
            index.add(codes.rows(np.arange(start, min(start + SCAN_BLOCK_ROWS, n))))
    firsts, seconds, scores = [], [], []
    for start in range(0, n, QUERY_BLOCK):
        queries = codes.rows(np.arange(start, min(start + QUERY_BLOCK, n)))
        found_scores, found = index.search(queries, min(NEIGHBOURS + 1, n))
        owner = np.broadcast_to(start + np.arange(len(queries))[:, None], found.shape)
        # A pair found from either side counts: j may be among i's neighbours or i among j's.
        keep = (found_scores >= threshold) & (found >= 0) & (found != owner)
        firsts.append(np.minimum(owner, found)[keep].astype(np.int32))
        seconds.append(np.maximum(owner, found)[keep].astype(np.int32))
        scores.append(found_scores[keep])
    keys = np.concatenate(firsts).astype(np.int64) * n + np.concatenate(seconds)  # one per pair
    keys, first = np.unique(keys, return_index=True)
    return (keys // n).astype(np.int32), (keys % n).astype(np.int32), np.concatenate(scores)[first]


def group_json(group: DuplicateGroup, shown: Callable[[object], str] = str) -> dict[str, object]:
    """One line of `cbir duplicates --json`."""
    return {"paths": [shown(p) for p in group.paths], "score": round(group.score, 6)}
