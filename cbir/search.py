"""Ranking by cosine similarity and choosing which categories to search. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cbir.features import expand_query

DEFAULT_MIN_CANDIDATES = 1000
DEFAULT_QUERY_EXPANSION = 3  # +0.03..0.08 mAP, P@1 unchanged (docs/quality.md)


@dataclass(frozen=True)
class Gating:
    """What a gated query searches, and why: the lists of the database's inverted file
    (cbir.db.ivf) where it has one, whole categories where it is too small for one."""

    wnids: tuple[str, ...]  # the categories, best first (none when gated by lists)
    fell_back: bool  # none of the query's own top-k categories is in the database
    order: str = "centroids"  # "centroids" (centred centroid cosine), "probability", "lists"
    # or "all" (--all)
    lists: tuple[int, ...] = ()  # the inverted lists, best first (order "lists"), after the
    # new rows (cbir.db.ivf.NEW_ROWS, -1), which a gate by lists always searches


def choose_categories(
    order: Sequence[str],
    members: Mapping[str, npt.NDArray[np.int64]],
    min_candidates: int = DEFAULT_MIN_CANDIDATES,
    sizes: Mapping[str, int] | None = None,
) -> tuple[str, ...]:
    """The categories of `order` (best first) that the database has, until they hold at least
    `min_candidates` distinct images (at least one category; a small database is searched
    whole).

    members: the sorted rows (or ids) of the images stored in each category; sizes: their
    counts, when known, so that members are read only where they decide (a first category as
    large as min_candidates needs no counting). An image stored in several chosen categories
    counts once: on a 1000-image database, counting it per category searched only 63 % of the
    rows and lost 5 % of exhaustive mAP (Fashion-MNIST, docs/quality.md).
    """
    chosen: list[str] = []
    parts: list[npt.NDArray[np.int64]] = []
    distinct = total = 0  # images in the chosen categories, counted once / once per category
    for wnid in order:
        if wnid not in members:
            continue
        if not chosen and sizes is not None and sizes.get(wnid, 0) >= min_candidates:
            return (wnid,)
        chosen.append(wnid)
        parts.append(members[wnid])
        total += len(parts[-1])
        if total >= min_candidates:  # only then can the distinct ones be enough: count them
            parts = [np.unique(np.concatenate(parts))]
            distinct = total = len(parts[0])
        if distinct >= min_candidates:
            break
    return tuple(chosen)


def top_matches(
    query: npt.NDArray[np.float32],
    features: npt.NDArray[np.float32],
    n: int,
    expansion: int = 0,
    alpha: float = 0.0,
    mean: npt.NDArray[np.float32] | None = None,
    mean_dots: npt.NDArray[np.float32] | None = None,
    head: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Indices and cosine scores of the n rows most similar to `query`, best first.

    query: (d,) unit-norm; features: (r, d) float32, rows unit-norm. One matrix product, then a
    partial sort, so 100k rows take milliseconds. With `expansion` m > 0 (query expansion), the
    best m rows keep their places and the rest are ordered by their cosine to the query
    averaged with those m (`cbir.features.expand_query`; alpha weighs them by score**alpha).
    With the database's `mean` (d,), rows and query are compared centred (cbir.centring;
    `mean_dots` (r,): features @ mean, if already known) and the expansion averages centred
    rows; a query `head` (d, d) (cbir train) maps each centred probe before it is compared.
    Scores stay cosines to the query itself. `cbir evaluate` ranks with this function,
    `cbir query` with cbir.ranking.rank, which ranks the same way on float16 rows.
    """
    from cbir.centring import centred, centred_scores, directed

    if len(features) == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if mean is not None and mean_dots is None:
        mean_dots = features @ mean

    def similarity(probe: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        probe = directed(probe, head)
        dots = features @ probe.astype(np.float32)
        return dots if mean is None else centred_scores(dots, mean_dots, probe, mean)

    probe = centred(query, mean)
    scores = similarity(probe)
    if expansion <= 0 or len(scores) <= expansion:
        best = best_of(scores, n)
        return best, features[best] @ query.astype(np.float32)
    top = best_of(scores, expansion)
    expanded_scores = similarity(expand_query(probe, centred(features[top], mean), scores[top],
                                              alpha))  # fmt: skip
    expanded_scores[top] = 3.0 + scores[top]  # above any cosine, in their first order
    best = best_of(expanded_scores, n)
    return best, features[best] @ query.astype(np.float32)


def best_of(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Indices of the n highest scores, highest first (ties in row order)."""
    n = min(n, len(scores))
    best = np.sort(np.argpartition(-scores, n - 1)[:n])  # row order, so the stable sort keeps it
    return best[np.argsort(-scores[best], kind="stable")].astype(np.int64)

