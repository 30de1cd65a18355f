"""Ranking by cosine similarity and choosing which categories to search. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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


def best_of(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Indices of the n highest scores, highest first (ties in row order)."""
    n = min(n, len(scores))
    best = np.sort(np.argpartition(-scores, n - 1)[:n])  # row order, so the stable sort keeps it
    return best[np.argsort(-scores[best], kind="stable")].astype(np.int64)

