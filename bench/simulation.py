"""Simulated searches over features described once: the gates, centring, PCA and budgets
bench/quality_grid.py, quality_scale.py, gating_lists.py and train_head.py compare, on a
corpus held in memory (no database), hundreds of settings in minutes. Rows are ranked by
cbir.ranking.rank, the ranking `cbir query` uses; what is simulated is the gate and the
variants the product does not have (PCA, whitening, plain cosines). `cbir evaluate` measures
the product itself (cbir.evaluate.evaluate_db); where both ran the same setting they agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.centring import MIN_IMAGES, directed, sums_by_category
from cbir.db.ivf import InvertedFile
from cbir.errors import CbirError
from cbir.evaluate import Evaluation, Tally
from cbir.features import apply_whitening, learn_whitening, normalise
from cbir.ranking import Float16Rows, rank
from cbir.search import DEFAULT_MIN_CANDIDATES, DEFAULT_QUERY_EXPANSION, choose_categories

# A gating rule: (query number q, an index into Corpus.queries; images per category, the query's
# own row left out) -> the categories to search.
ChooseCategories = Callable[[int, Mapping[str, npt.NDArray[np.int64]]], Sequence[str]]


@dataclass(frozen=True)
class Corpus:
    """A database under test: n rows, q of them also used as queries."""

    labels: list[str | None]  # (n,) class or group of each row; None: distractor, never relevant
    features: npt.NDArray[np.float32]  # (n, d) stored descriptors, rows unit-norm
    memberships: list[tuple[str, ...]]  # (n,) the categories each row is stored in
    queries: npt.NDArray[np.int64]  # (q,) row of each query image
    query_features: npt.NDArray[np.float32]  # (q, d) the query images described at query time
    query_probs: npt.NDArray[np.float32]  # (q, 1000) their class probabilities


@dataclass(frozen=True)
class SearchSettings:
    """How queries are answered; the defaults are those of `cbir query`."""

    top_k: int = 4  # the query's own categories (a database's top_k)
    min_candidates: int = DEFAULT_MIN_CANDIDATES
    query_expansion: int = DEFAULT_QUERY_EXPANSION  # m: expand with the top m, re-rank the rest
    qe_alpha: float = 0.0  # weigh expansion rows by score**alpha (0: plain average)
    centre: bool = True  # compare centred on the database's mean, gate by centroids (cbir.centring)
    pca: bool = False  # project onto a PCA learned on the corpus's own rows (cbir.features)
    pca_dim: int | None = None  # keep this many axes (None: all)
    whiten_power: float = 0.0  # scale axis i by variance_i ** -power (0.5: PCA-whitening)


def evaluate_corpus(
    corpus: Corpus, settings: SearchSettings, choose: ChooseCategories | None = None,
    head: npt.NDArray[np.float32] | None = None,
) -> Evaluation:
    """Run every query gated and exhaustively, ranked as `cbir query` ranks a database (plus
    the optional PCA and query expansion of the settings; with a database's query `head`
    (d, d) from `cbir train`, which maps centred queries).

    As if the query were not in the database, its own row is left out of everything: of the
    ranking, of the category sizes that gating counts, and of the mean and category
    centroids that centring uses. Gating uses `choose` (default: the categories by centred
    centroid cosine, or by class probability without centring, widened by
    cbir.search.choose_categories to min_candidates images). Queries without a relevant
    image are left out.
    """
    n = len(corpus.labels)
    features, query_features = corpus.features, corpus.query_features
    if settings.pca:
        whitening = learn_whitening(features, settings.pca_dim, settings.whiten_power)
        features = apply_whitening(whitening, features)
        query_features = apply_whitening(whitening, query_features)
    centring = _Centring(corpus, features) if settings.centre and not settings.pca \
        and n > MIN_IMAGES else None  # fmt: skip
    if centring is None:
        head = None  # a head is learned on centred features
    wnids = categories.wnids()
    rows_of: dict[str, list[int]] = {}
    for row, member in enumerate(corpus.memberships):
        for wnid in member:
            if wnid:
                rows_of.setdefault(wnid, []).append(row)
    members = {w: np.array(r, np.int64) for w, r in rows_of.items()}
    labels = np.array([label or "" for label in corpus.labels], dtype=object)
    gated, exhaustive = Tally.new(), Tally.new()
    n_labels = len({label for label in corpus.labels if label is not None})
    for i, row in enumerate(corpus.queries):
        label = corpus.labels[row]
        if label is None:
            continue
        relevant = labels == label
        relevant[row] = False
        if not relevant.any():
            continue
        query = query_features[i]
        mean, mean_dots, order = None, None, None
        if centring is not None:
            mean, mean_dots, order = centring.without(int(row), query, head)
        else:
            order = [wnids[j] for j in np.argsort(-corpus.query_probs[i])]
        everything = np.ones(n, bool)
        everything[row] = False
        exhaustive.add(_rank(query, features, everything, settings, mean, mean_dots, head),
                       relevant, n - 1)  # fmt: skip
        available = dict(members)  # as if the query were not in the database
        for wnid in set(corpus.memberships[row]) - {""}:
            available[wnid] = members[wnid][members[wnid] != row]
            if not len(available[wnid]):
                del available[wnid]
        searched = np.zeros(n, bool)
        chosen = choose(i, available) if choose is not None else \
            choose_categories(order, available, settings.min_candidates)  # fmt: skip
        for wnid in chosen:
            searched[members[wnid]] = True
        searched[row] = False
        gated.add(_rank(query, features, searched, settings, mean, mean_dots, head), relevant,
                  int(searched.sum()))  # fmt: skip
    if not gated.ap:
        raise CbirError("no query has a relevant image: every label needs at least two images")
    kept = [
        len(np.intersect1d(g, e)) / len(e) for g, e in zip(gated.top, exhaustive.top, strict=True)
    ]
    return Evaluation(
        n_images=n, n_queries=len(gated.ap), n_labels=n_labels, settings=settings,  # type: ignore[arg-type]
        gated=gated.scores(n - 1), exhaustive=exhaustive.scores(n - 1),
        top10_kept=float(np.mean(kept)),
    )  # fmt: skip


def gate_by_lists(
    inverted: InvertedFile, query_features: npt.NDArray[np.float32],
    head: npt.NDArray[np.float32] | None, min_candidates: int,
) -> ChooseCategories:
    """Gating by a database's inverted lists, as cbir.query gates: the lists by centroid
    cosine to the (mapped) probe, until they hold min_candidates images. The centroids were
    trained on a sample that may hold the query's own row: one of about 40 per list."""

    def choose(q: int, available: Mapping[str, npt.NDArray[np.int64]]) -> Sequence[str]:
        probe = directed(inverted.probe(query_features[q]), head)
        order = [f"list {x}" for x in inverted.order(probe).tolist()]
        return choose_categories(order, available, min_candidates)

    return choose


class _Centring:
    """The corpus's feature sums, overall and per category, from which each query's mean and
    centroids are made without its own row (as the catalog's sums would be)."""

    def __init__(self, corpus: Corpus, features: npt.NDArray[np.float32]) -> None:
        self.corpus, self.features = corpus, features
        f64 = features.astype(np.float64)
        self.total = f64.sum(axis=0)
        self.sums = sums_by_category(f64, [tuple(w for w in m if w) for m in corpus.memberships])
        self.sums.pop("", None)
        self.wnids = sorted(self.sums)
        self.sizes = Counter(w for m in corpus.memberships for w in m if w)
        self.total_dots = features @ self.total.astype(np.float32)  # (n,) x . sum

    def without(
        self, row: int, query: npt.NDArray[np.float32], head: npt.NDArray[np.float32] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[str]]:
        """(mean (d,), features @ mean (n,), categories by centroid) with `row` left out;
        the centroids are compared with the centred query mapped by `head`, if given."""
        n = len(self.features)
        own_feature = self.features[row].astype(np.float64)
        mean = (self.total - own_feature) / (n - 1)
        mean_dots = (self.total_dots - self.features @ self.features[row]) / (n - 1)
        own = set(self.corpus.memberships[row])
        kept, means = [], []
        for wnid in self.wnids:
            size = self.sizes[wnid] - (wnid in own)
            if size > 0:
                kept.append(wnid)
                means.append((self.sums[wnid] - own_feature * (wnid in own)) / size)
        centroids = normalise(np.array(means) - mean) if kept else np.zeros((0, len(mean)))
        centred_query = directed(normalise(query - mean.astype(np.float32)), head)
        order = np.argsort(-(centroids @ centred_query), kind="stable")
        return mean.astype(np.float32), mean_dots.astype(np.float32), [kept[j] for j in order]


def _rank(
    query: npt.NDArray[np.float32],
    features: npt.NDArray[np.float32],
    searched: npt.NDArray[np.bool_],
    settings: SearchSettings,
    mean: npt.NDArray[np.float32] | None = None,
    mean_dots: npt.NDArray[np.float32] | None = None,
    head: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.int64]:
    """All searched rows (mask (n,)), best first, ranked by cbir's ranking (cbir.ranking.rank;
    mean_dots is not needed by it: kept for the callers)."""
    rows = np.flatnonzero(searched)
    ranked = rank(Float16Rows.of(features[rows]), query, len(rows), settings.query_expansion,
                  mean=mean, head=head)  # fmt: skip
    return rows[ranked.positions]
