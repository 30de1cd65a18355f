"""Ranking by cosine similarity and choosing which categories to search. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cbir.features import expand_query

DEFAULT_MIN_CANDIDATES = 1000
DEFAULT_QUERY_EXPANSION = 3  # +0.03..0.08 mAP, P@1 unchanged (docs/quality.md)


@dataclass(frozen=True)
class Gating:
    """Which categories a query searches, and why."""

    wnids: tuple[str, ...]  # most probable first
    fell_back: bool  # none of the query's own top-k categories is in the database
    widened: bool  # categories beyond the top-k were added to reach enough candidates


def choose_categories(
    probs: npt.NDArray[np.float32],
    wnids: list[str],
    members: Mapping[str, npt.NDArray[np.int64]],
    top_k: int,
    min_candidates: int = DEFAULT_MIN_CANDIDATES,
    sizes: Mapping[str, int] | None = None,
) -> Gating:
    """The query's top-k categories that the database has, widened by probability until
    they hold at least `min_candidates` distinct images (so a small database is searched whole).

    probs: (1000,) the query's class probabilities; wnids: the classes in the same order;
    members: the ids of the images stored in each category; sizes: their counts, when known,
    so that members are read only where they decide (a category as large as min_candidates
    needs no counting). An image stored in several chosen categories counts once: on a
    1000-image database, counting it per category searched only 63 % of the rows and lost 5 %
    of exhaustive mAP (Fashion-MNIST, docs/quality.md).
    """
    order = np.argsort(-probs)
    chosen = [wnids[i] for i in order[:top_k] if wnids[i] in members]
    has_own = bool(chosen)
    if sizes is not None and chosen and max(sizes[w] for w in chosen) >= min_candidates:
        return Gating(tuple(chosen), fell_back=False, widened=False)
    seen: set[int] = set()
    for wnid in chosen:
        seen.update(members[wnid].tolist())
    widened = False
    for i in order[top_k:]:
        if chosen and len(seen) >= min_candidates:
            break
        wnid = wnids[i]
        if wnid in members:
            chosen.append(wnid)
            seen.update(members[wnid].tolist())
            widened = True
    return Gating(
        tuple(chosen), fell_back=not has_own and bool(chosen), widened=widened and has_own
    )


def top_matches(
    query: npt.NDArray[np.float32],
    features: npt.NDArray[np.float32],
    n: int,
    expansion: int = 0,
    alpha: float = 0.0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Indices and cosine scores of the n rows most similar to `query`, best first.

    query: (d,) unit-norm; features: (r, d) float32, rows unit-norm. One matrix product, then a
    partial sort, so 100k rows take milliseconds. With `expansion` m > 0 (query expansion), the
    best m rows keep their places and the rest are ordered by their cosine to the query
    averaged with those m (`cbir.features.expand_query`; alpha weighs them by score**alpha);
    scores stay cosines to the query itself. `cbir evaluate` ranks with this same function.
    """
    if len(features) == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores = features @ query.astype(np.float32)
    if expansion <= 0 or len(scores) <= expansion:
        best = _best(scores, n)
        return best, scores[best]
    top = _best(scores, expansion)
    expanded_scores = features @ expand_query(query, features[top], scores[top], alpha)
    expanded_scores[top] = 3.0 + scores[top]  # above any cosine, in their first order
    best = _best(expanded_scores, n)
    return best, scores[best]


def _best(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Indices of the n highest scores, highest first (ties in row order)."""
    n = min(n, len(scores))
    best = np.sort(np.argpartition(-scores, n - 1)[:n])  # row order, so the stable sort keeps it
    return best[np.argsort(-scores[best], kind="stable")].astype(np.int64)

