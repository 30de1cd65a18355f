"""Ranking by cosine similarity and choosing which categories to search. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DEFAULT_MIN_CANDIDATES = 1000


@dataclass(frozen=True)
class Gating:
    """Which categories a query searches, and why."""

    wnids: tuple[str, ...]  # most probable first
    fell_back: bool  # none of the query's own top-k categories is in the database
    widened: bool  # categories beyond the top-k were added to reach enough candidates


def choose_categories(
    probs: npt.NDArray[np.float32],
    wnids: list[str],
    available: Mapping[str, int],
    top_k: int,
    min_candidates: int = DEFAULT_MIN_CANDIDATES,
) -> Gating:
    """The query's top-k categories that the database has, widened by probability until
    they hold at least `min_candidates` images (so a small database is searched whole).

    probs: (1000,) the query's class probabilities; wnids: the classes in the same order;
    available: images per category in the database.
    """
    order = np.argsort(-probs)
    own = [wnids[i] for i in order[:top_k] if wnids[i] in available]
    chosen = list(own)
    count = sum(available[w] for w in chosen)
    widened = False
    for i in order[top_k:]:
        if chosen and count >= min_candidates:
            break
        wnid = wnids[i]
        if wnid in available:
            chosen.append(wnid)
            count += available[wnid]
            widened = True
    return Gating(tuple(chosen), fell_back=not own and bool(chosen), widened=widened and bool(own))


def top_matches(
    query: npt.NDArray[np.float32], features: npt.NDArray[np.float32], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Indices and cosine scores of the n rows most similar to `query`, best first.

    query: (d,) unit-norm; features: (r, d) float32, rows unit-norm. One matrix product, then a
    partial sort, so 100k rows take milliseconds.
    """
    if len(features) == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores = features @ query.astype(np.float32)
    n = min(n, len(scores))
    best = np.argpartition(-scores, n - 1)[:n]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best.astype(np.int64), scores[best]
