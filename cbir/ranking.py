"""Ranking float16 rows with FAISS: scores computed on the stored float16 values directly.

Converting float16 rows to float32 with numpy cost 7 ns a value on this machine (1 s for the
60k-image matrix, 80 % of an exhaustive query); FAISS's scalar-quantizer index (QT_fp16, inner
product) reads the same bytes and scores them with SIMD, 30x faster. A `Float16Rows` holds a
copy of the rows it ranks (gathered candidates, or one block of the matrix at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class Float16Rows:
    """Rows of d float16 values (as bytes, (n, 2d) uint8), ranked by inner product."""

    def __init__(self, dim: int) -> None:
        import faiss

        self._faiss = faiss
        self.dim = dim
        self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                                faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        self.index.is_trained = True  # float16 needs no training

    @classmethod
    def of(cls, features: npt.NDArray[np.floating]) -> Float16Rows:
        """Rows holding `features` (n, d), as float16."""
        features = np.ascontiguousarray(features, np.float16)
        rows = cls(features.shape[1])
        rows.buffer(len(features))[:] = features.view(np.uint8).reshape(len(features), -1)
        return rows

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def buffer(self, n: int) -> npt.NDArray[np.uint8]:
        """A (n, 2d) uint8 view of the index's own storage, to fill with n rows."""
        width = 2 * self.dim
        self.index.codes.resize(n * width)
        self.index.ntotal = n
        if n == 0:
            return np.zeros((0, width), np.uint8)
        return self._faiss.rev_swig_ptr(self.index.codes.data(), n * width).reshape(n, width)

    def top(
        self, queries: npt.NDArray[np.float32], k: int, only: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(scores, positions), each (q, k), best first, among all rows or the positions
        `only`; positions are -1 past the rows searched."""
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dim)
        searched = len(self) if only is None else len(only)
        if searched == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = max(1, min(k, searched))
        if only is None:
            scores, positions = self.index.search(queries, k)
        else:
            chosen = np.zeros(len(self), bool)
            chosen[only] = True
            bitmap = np.packbits(chosen, bitorder="little")
            selector = self._faiss.IDSelectorBitmap(len(self), self._faiss.swig_ptr(bitmap))
            params = self._faiss.SearchParameters(sel=selector)
            scores, positions = self.index.search(queries, k, params=params)
        return scores, positions.astype(np.int64)

    def rows(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(m, d) float32 values of the rows at `positions`."""
        codes = self.buffer_view()[np.asarray(positions, np.int64)]
        return self.index.sa_decode(np.ascontiguousarray(codes))

    def buffer_view(self) -> npt.NDArray[np.uint8]:
        n, width = len(self), 2 * self.dim
        return self._faiss.rev_swig_ptr(self.index.codes.data(), n * width).reshape(n, width)


class CentredRows:
    """Rows centred on a database's mean and made unit-norm again, as float16, in `shards`
    parts: the centred cosine of a row to a centred probe is then one inner product, which
    FAISS scans at memory speed (the two inner products per row that Float16Rows needs for
    it, all of them kept, cost 4-5x a plain scan), the parts side by side on the cores.
    Built from stored rows (n, d) a block at a time: 2 d bytes per row more."""

    BLOCK = 16384

    def __init__(self, rows: Float16Rows, mean: npt.NDArray[np.float32], shards: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from cbir.centring import centred

        n = len(rows)
        bounds = np.linspace(0, n, max(1, shards) + 1).astype(np.int64)
        self.starts = bounds[:-1]
        self.shards: list[Float16Rows] = []
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            shard = Float16Rows(rows.dim)
            codes = shard.buffer(end - start)
            for at in range(start, end, self.BLOCK):
                stop = min(end, at + self.BLOCK)
                unit = centred(rows.rows(np.arange(at, stop)), mean).astype(np.float16)
                codes[at - start : stop - start] = unit.view(np.uint8).reshape(stop - at, -1)
            self.shards.append(shard)
        self._pool = ThreadPoolExecutor(len(self.shards)) if len(self.shards) > 1 else None

    def top(
        self, probe: npt.NDArray[np.float32], k: int, only: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(scores, positions) (k,) of the k rows (all, or the sorted positions `only`) with
        the highest inner product with `probe` (d,), best first."""

        def one(i: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
            start = int(self.starts[i])
            part = None
            if only is not None:
                end = start + len(self.shards[i])
                part = only[(only >= start) & (only < end)] - start
            scores, positions = self.shards[i].top(probe[None, :], k, part)
            found = positions[0] >= 0
            return scores[0][found], positions[0][found] + start

        parts = list(self._pool.map(one, range(len(self.shards)))) if self._pool \
            else [one(0)]  # fmt: skip
        scores = np.concatenate([p[0] for p in parts])
        positions = np.concatenate([p[1] for p in parts])
        order = np.lexsort((positions, -scores))[:k]  # ties go to the lower position
        return scores[order], positions[order]


# The best k of a query's rows for a probe (d,): (scores (k,), positions (k,)), best first.
TopRows = Callable[[npt.NDArray[np.float32], int], tuple[npt.NDArray[np.float32],
                                                         npt.NDArray[np.int64]]]  # fmt: skip
# The stored features (m, d) float32 of rows at positions (m,).
FeaturesAt = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Ranked:
    """A query's best rows, best first: positions (k,), the scores they were ranked by (k,),
    which never rise down the list, and their plain cosines to the query (k,)."""

    positions: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    cosines: npt.NDArray[np.float32]

    def take(self, keep: npt.NDArray[np.bool_] | slice) -> Ranked:
        return Ranked(self.positions[keep], self.scores[keep], self.cosines[keep])

    def at(self, positions: npt.NDArray[np.int64]) -> Ranked:
        """The same ranking with positions mapped through `positions` (e.g. pool -> row)."""
        return Ranked(positions[self.positions], self.scores, self.cosines)


def rank_by(
    top: TopRows, features_at: FeaturesAt, searched: int, query: npt.NDArray[np.float32],
    n: int, expansion: int, mean: npt.NDArray[np.float32] | None,
    head: npt.NDArray[np.float32] | None,
) -> Ranked:
    """The one ranking of cbir, whatever holds the rows: the n best of `searched` rows for a
    unit-norm `query` (d,), compared centred on the database's `mean` (d,) when given, the
    centred probe mapped by its query `head` (d, d) when trained (cbir.centring).

    With `expansion` m > 0 (and more than m rows), the centred query averaged with its first
    m rows is a second probe (query expansion: +0.03..0.08 mAP, docs/quality.md), and a row
    scores the higher of its cosines to the two: an image's own copy keeps its 1.0 and its
    place, and a row the expanded query finds rises by that. Every score is one number, at
    most 1, and falls down the list. Exact: each probe's best n rows are found (one pass each
    over the rows, by `top`), and any other row scores below the n-th of either."""
    from cbir.centring import centred, directed
    from cbir.features import expand_query

    if searched == 0 or n <= 0:
        return Ranked(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
    query = np.asarray(query, np.float32)
    probe = centred(query, mean)
    by_query = directed(probe, head)
    expanding = 0 < expansion < searched
    scores, positions = top(by_query, max(n, expansion) if expanding else n)
    if not expanding:
        return Ranked(positions, np.minimum(scores, 1.0),
                      np.minimum(features_at(positions) @ query, 1.0))  # fmt: skip
    first = positions[:expansion]
    stored = features_at(first)
    by_expanded = directed(expand_query(probe, centred(stored, mean)), head)
    _, found = top(by_expanded, n)
    union = np.union1d(positions, found)  # sorted: ties go to the lower position
    stored = features_at(union)
    rows = centred(stored, mean)
    both = np.maximum(rows @ by_query, rows @ by_expanded)
    order = np.argsort(-both, kind="stable")[:n]
    return Ranked(union[order], np.minimum(both[order], 1.0).astype(np.float32),
                  np.minimum(stored[order] @ query, 1.0).astype(np.float32))  # fmt: skip


def rank(
    rows: Float16Rows,
    query: npt.NDArray[np.float32],
    n: int,
    expansion: int,
    only: npt.NDArray[np.int64] | None = None,
    mean: npt.NDArray[np.float32] | None = None,
    head: npt.NDArray[np.float32] | None = None,
) -> Ranked:
    """rank_by over rows held in memory: all of them, or the positions `only`."""
    if only is not None:
        only = np.unique(only)  # a position listed twice would leave FAISS a -1 to return
    searched = len(rows) if only is None else len(only)
    return rank_by(lambda probe, k: top_rows(rows, probe, k, only, mean), rows.rows, searched,
                   query, n, expansion, mean, head)  # fmt: skip


def top_rows(
    rows: Float16Rows,
    query: npt.NDArray[np.float32],
    k: int,
    only: npt.NDArray[np.int64] | None = None,
    mean: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(scores, positions) (k,) of the k best rows (all, or the sorted, distinct positions
    `only`), best first: by inner product with `query`, or, given the `mean`, by the centred
    cosine to the centred `query`. The centred
    form needs every searched row's two inner products (one FAISS pass over them for the
    query and the mean), then a partial sort; ties go to the lower position."""
    from cbir.centring import centred_scores
    from cbir.search import best_of

    if mean is None:
        scores, positions = rows.top(query[None, :], k, only)
        found = positions[0] >= 0
        return scores[0][found], positions[0][found]
    searched = len(rows) if only is None else len(only)
    dots, positions = rows.top(np.stack([query, mean]), searched, only)
    by_query, by_mean = np.argsort(positions[0]), np.argsort(positions[1])
    at = positions[0][by_query]  # the searched positions, ascending
    centred = centred_scores(dots[0][by_query], dots[1][by_mean], query, mean)
    best = best_of(centred, k)
    return centred[best], at[best]
