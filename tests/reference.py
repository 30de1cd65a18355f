"""The ranking as the README defines it, in plain float64 numpy: what the tests hold
cbir.ranking's FAISS code (and every front end over it) to."""

from __future__ import annotations

import numpy as np


def definition(
    query: np.ndarray, features: np.ndarray, n: int, expansion: int = 0,
    mean: np.ndarray | None = None, head: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ranking as the README defines it, in plain numpy: rows and query centred on the
    mean and made unit-norm, the centred query mapped by the head; with expansion m, a row
    scores the higher of its cosines to that probe and to the query averaged with its first m
    rows (mapped alike); (order, the scores it was ranked by)."""

    def centred(x: np.ndarray) -> np.ndarray:
        x = x if mean is None else x - mean
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def unit(p: np.ndarray) -> np.ndarray:
        return p / np.linalg.norm(p)

    def directed(p: np.ndarray) -> np.ndarray:
        return p if head is None else unit(head @ p)

    rows, probe = centred(features.astype(np.float64)), centred(query.astype(np.float64))
    scores = rows @ directed(probe)
    if 0 < expansion < len(rows):
        first = np.argsort(-scores, kind="stable")[:expansion]
        scores = np.maximum(scores, rows @ directed(unit(probe + rows[first].sum(axis=0))))
    order = np.argsort(-scores, kind="stable")[:n]
    return order, scores[order]
