"""Retrieval quality, measured: metrics over rankings, and the runner behind `cbir evaluate`.

Every image of a labelled set is a query against all the others (leave-one-out). Definitions,
used everywhere in cbir:

- ranking: the database rows in the order a search returns them, the query's own row removed;
  rows the search never compared (outside the gated categories) are not in it.
- relevant: another image with the same label (class folder, or group of a --groups file).
- AP (non-interpolated average precision): the sum, over the relevant images in the ranking, of
  the precision at each one's rank, divided by the number of relevant images in the database;
  a relevant image the search never returned adds 0. Ranking [rel, non, rel] with 3 relevant
  images in the database: AP = (1/1 + 2/3) / 3.
- P@k: relevant images among the first k, divided by k (also when fewer than k were returned).
- R@k: relevant images among the first k, divided by the number of relevant images.
- mAP, mean P@k, mean R@k: means over queries with at least one relevant image.
- gating recall: the share of the exhaustive top-10 that the gated search also returns.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.centring import MIN_IMAGES, directed, sums_by_category
from cbir.db.ivf import InvertedFile
from cbir.errors import BadImage, CbirError
from cbir.features import apply_whitening, learn_whitening, normalise
from cbir.search import (
    DEFAULT_MIN_CANDIDATES,
    DEFAULT_QUERY_EXPANSION,
    choose_categories,
    top_matches,
)

TOP = 10  # depth of P@10, R@10 and the gating recall
BATCH = 32  # images per forward pass when the queries are described

# A gating rule: (query number q, an index into Corpus.queries; images per category, the query's
# own row left out) -> the categories to search.
ChooseCategories = Callable[[int, Mapping[str, npt.NDArray[np.int64]]], Sequence[str]]


# -- metrics: pure functions of one ranking ---------------------------------------------------


def average_precision(relevant: Sequence[bool] | npt.NDArray[np.bool_], n_relevant: int) -> float:
    """Non-interpolated AP of a ranking. relevant: (r,) bool, best first; n_relevant: how many
    relevant images the database holds (>= those in the ranking)."""
    if n_relevant <= 0:
        raise ValueError("AP is undefined for a query without relevant images")
    ranks = np.flatnonzero(np.asarray(relevant, bool)) + 1  # 1-based ranks of the hits
    if len(ranks) > n_relevant:
        raise ValueError("the ranking holds more relevant images than n_relevant")
    return float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / n_relevant)


def precision_at(relevant: Sequence[bool] | npt.NDArray[np.bool_], k: int) -> float:
    """Relevant images among the first k, over k. relevant: (r,) bool, best first."""
    return float(np.count_nonzero(np.asarray(relevant, bool)[:k]) / k)


def recall_at(relevant: Sequence[bool] | npt.NDArray[np.bool_], k: int, n_relevant: int) -> float:
    """Relevant images among the first k, over all relevant images in the database."""
    return float(np.count_nonzero(np.asarray(relevant, bool)[:k]) / n_relevant)


def mean_average_precision(
    rankings: Sequence[Sequence[bool] | npt.NDArray[np.bool_]], n_relevant: Sequence[int]
) -> float:
    """mAP over queries: rankings[i] (r_i,) bool, n_relevant[i] that query's relevant count."""
    if not rankings:
        raise ValueError("mAP of no queries")
    aps = [average_precision(r, n) for r, n in zip(rankings, n_relevant, strict=True)]
    return float(np.mean(aps))


# -- the collection under test and how it is searched -----------------------------------------


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


@dataclass(frozen=True)
class Scores:
    """Mean quality of one way of searching, over all queries."""

    map: float
    p_at_1: float
    p_at_5: float
    p_at_10: float
    r_at_10: float
    rows_searched: float  # mean rows compared per query, its own row not counted
    rows_share: float  # rows_searched over the rows a query could be compared with (n - 1)
    no_relevant: float  # share of queries whose searched rows held no relevant image


@dataclass(frozen=True)
class Evaluation:
    n_images: int
    n_queries: int
    n_labels: int
    settings: SearchSettings
    gated: Scores
    exhaustive: Scores
    top10_kept: float  # gating recall: share of the exhaustive top-10 the gated search returns

    @property
    def map_ratio(self) -> float:
        """Gated mAP as a share of exhaustive mAP."""
        return self.gated.map / self.exhaustive.map if self.exhaustive.map > 0 else 1.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["map_ratio"] = self.map_ratio
        return data


@dataclass
class _Tally:
    """Per-query values of one way of searching, summed into Scores at the end."""

    ap: list[float]
    p1: list[float]
    p5: list[float]
    p10: list[float]
    r10: list[float]
    rows: list[int]
    none_relevant: list[bool]
    top: list[npt.NDArray[np.int64]]

    @classmethod
    def new(cls) -> _Tally:
        return cls([], [], [], [], [], [], [], [])

    def add(
        self, ranked: npt.NDArray[np.int64], relevant: npt.NDArray[np.bool_], n_searched: int
    ) -> None:
        """ranked: (r,) rows best first; relevant: (n,) bool over all rows."""
        hits = relevant[ranked]
        n_relevant = int(np.count_nonzero(relevant))
        self.ap.append(average_precision(hits, n_relevant))
        self.p1.append(precision_at(hits, 1))
        self.p5.append(precision_at(hits, 5))
        self.p10.append(precision_at(hits, TOP))
        self.r10.append(recall_at(hits, TOP, n_relevant))
        self.rows.append(n_searched)
        self.none_relevant.append(not hits.any())
        self.top.append(ranked[:TOP])

    def scores(self, n_rows: int) -> Scores:
        rows = float(np.mean(self.rows))
        return Scores(
            float(np.mean(self.ap)), float(np.mean(self.p1)), float(np.mean(self.p5)),
            float(np.mean(self.p10)), float(np.mean(self.r10)), rows,
            rows / max(n_rows - 1, 1), float(np.mean(self.none_relevant)),
        )  # fmt: skip


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
    gated, exhaustive = _Tally.new(), _Tally.new()
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
        n_images=n, n_queries=len(gated.ap), n_labels=n_labels, settings=settings,
        gated=gated.scores(n), exhaustive=exhaustive.scores(n), top10_kept=float(np.mean(kept)),
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
    """All searched rows (mask (n,)), best first, ranked exactly as `cbir query` ranks them."""
    rows = np.flatnonzero(searched)
    order, _ = top_matches(
        query, features[rows], len(rows), settings.query_expansion, settings.qe_alpha,
        mean, None if mean_dots is None else mean_dots[rows], head,
    )  # fmt: skip
    return rows[order]


# -- labels ------------------------------------------------------------------------------------


def labels_from_folders(labelled_dir: Path) -> dict[str, str | None]:
    """Absolute path -> class, the first folder under `labelled_dir` (files at its top level
    are distractors). Only image files count."""
    from cbir.images import find_images

    root = Path(os.path.abspath(labelled_dir))
    if not root.is_dir():
        raise CbirError(f"labelled folder {labelled_dir} does not exist")
    labels: dict[str, str | None] = {}
    for item in find_images([root]):
        if isinstance(item, BadImage):
            continue
        parts = item.relative_to(root).parts
        labels[str(item)] = parts[0] if len(parts) > 1 else None
    return labels


def labels_from_csv(groups_file: Path) -> dict[str, str | None]:
    """Absolute path -> group from `path,group` rows (an optional header; paths relative to
    the file's folder). An empty group marks a distractor: indexed, never relevant."""
    base = Path(os.path.abspath(groups_file)).parent
    try:
        with open(groups_file, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except OSError as exc:
        raise CbirError(f"cannot read {groups_file}: {exc.strerror}") from exc
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "group"]:
        rows = rows[1:]
    labels: dict[str, str | None] = {}
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise CbirError(f"{groups_file}: row {number} is not 'path,group'")
        path = Path(os.path.abspath(base / row[0].strip()))
        if not path.is_file():
            raise CbirError(f"{groups_file}: {row[0].strip()} does not exist")
        labels[str(path)] = row[1].strip() or None
    if not labels:
        raise CbirError(f"{groups_file} lists no images")
    return labels


# -- the runner: database, model, corpus ------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    backbone: str | None = None  # None: the database's, or cbir's default for a new one
    weights: str | None = None
    pooling: str = "gap"  # of a temporary database
    engine: str = "auto"
    precision: str = "auto"
    search: SearchSettings = SearchSettings()
    use_head: bool = True  # rank with the database's query head (cbir train), if it has one


@dataclass(frozen=True)
class RunReport:
    evaluation: Evaluation
    backbone: str
    pooling: str
    not_indexed: int  # labelled files not in the database (unreadable, or missing from --db)
    head: dict | None = None  # provenance of the database's query head (cbir train), if used
    gated_by: str = "categories"  # or "lists": the database's inverted file (cbir.db.ivf)


def run_evaluation(
    labels: dict[str, str | None], options: RunOptions, db_dir: Path | None = None,
    distractors: Path | None = None,
) -> RunReport:
    """Index the labelled images (and the images under `distractors`, unlabelled) into a
    temporary database, or use `db_dir`, then evaluate every labelled image against the rest
    through the database's stored rows."""
    if db_dir is not None:
        return _evaluate_db(db_dir, labels, options)
    from cbir.indexing import IndexOptions, index_paths
    from cbir.model import DEFAULT_BACKBONE

    backbone = options.backbone or DEFAULT_BACKBONE
    index = IndexOptions(
        backbone=backbone, weights=options.weights or "imagenet", top_k=options.search.top_k,
        link="symlink", pooling=options.pooling, engine=options.engine,
        precision=options.precision,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cbir-evaluate-") as tmp:
        temp_db = Path(tmp) / "db"
        sources = [Path(p) for p in sorted(labels)] + ([distractors] if distractors else [])
        index_paths(temp_db, sources, index)
        return _evaluate_db(temp_db, labels, options)


def _evaluate_db(db_dir: Path, labels: dict[str, str | None], options: RunOptions) -> RunReport:
    from cbir.images import load_image
    from cbir.query import QueryOptions, open_for_query

    query_options = QueryOptions(engine=options.engine, precision=options.precision)
    db, model = open_for_query(db_dir, query_options, options.backbone, options.weights)
    records = {r.image_id: r for r in db.images()}
    ids, matrix_rows = db.catalog.all_rows()
    stored_features = db.matrix().gather(matrix_rows)
    paths_of: dict[int, list[str]] = {}
    for path, rec in db.paths():
        paths_of.setdefault(rec.image_id, []).append(path)
    row_labels: list[str | None] = []
    for image_id in ids.tolist():
        found = [labels[p] for p in paths_of.get(image_id, []) if p in labels]
        row_labels.append(next((label for label in found if label is not None), None))
    indexed = {p for image_id, ps in paths_of.items() if image_id in records for p in ps}
    queries = np.array([i for i, label in enumerate(row_labels) if label is not None], np.int64)
    if len(queries) == 0:
        raise CbirError(f"none of the labelled images is in the database {db_dir}")
    probs, features = [], []
    size = model.backbone.input_size
    for start in range(0, len(queries), BATCH):
        batch = []
        for row in queries[start : start + BATCH]:
            stored = db.stored_path(records[int(ids[row])])
            batch.append(load_image(stored, size, resize=db.settings.resize))
        described = model.describe(np.stack(batch))
        probs.append(described.probs)
        features.append(described.features[db.settings.pooling])
    search = options.search
    if search.top_k != db.settings.top_k:
        search = SearchSettings(**{**asdict(search), "top_k": db.settings.top_k})
    # the head maps centred queries: used where evaluate_corpus centres
    centred = search.centre and not search.pca and len(ids) > MIN_IMAGES
    head = db.query_head() if centred and options.use_head else None
    query_features = np.concatenate(features)
    inverted = db.ivf() if centred else None
    memberships = [records[i].wnids for i in ids.tolist()]
    choose: ChooseCategories | None = None
    if inverted is not None:  # gated as cbir query gates it: by the inverted lists
        memberships = [(f"list {x}",) for x in db.catalog.lists_in_row_order().tolist()]
        choose = gate_by_lists(inverted, query_features, head, search.min_candidates)
    corpus = Corpus(
        labels=row_labels,
        features=stored_features,
        memberships=memberships,
        queries=queries,
        query_features=query_features,
        query_probs=np.concatenate(probs),
    )
    evaluation = evaluate_corpus(corpus, search, choose, head=head)
    not_indexed = sum(1 for p in labels if p not in indexed)
    return RunReport(evaluation, db.settings.backbone, db.settings.pooling, not_indexed,
                     None if head is None else db.head_provenance(),
                     "categories" if inverted is None else "lists")  # fmt: skip
