"""Retrieval quality, measured: metrics over rankings, and the runner behind `cbir evaluate`.

Every image of a labelled set is a query against all the others (leave-one-out), through the
query path every front end takes (cbir.query.rank_described), by its stored feature: the
image itself is left out of the results, and stays in the database's mean and in what its
gate counts. Definitions, used everywhere in cbir:

- ranking: the first DEPTH (1000) database rows in the order a search returns them, the
  query's own row removed; rows the search never compared (outside the gated lists or
  categories) are not in it.
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir.db import Database
from cbir.db.database import CategoryMembers
from cbir.errors import BadImage, CbirError
from cbir.search import DEFAULT_MIN_CANDIDATES, DEFAULT_QUERY_EXPANSION

TOP = 10  # depth of P@10, R@10 and the gating recall
DEPTH = 1000  # rows of each ranking scored: a relevant image further down adds under 1/DEPTH
# of its AP; a full ranking of 70k rows cost 1 s a query (every row's features decoded)


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


# -- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSettings:
    """How queries are answered; the defaults are those of `cbir query`."""

    top_k: int = 4  # categories per image of a temporary database
    min_candidates: int = DEFAULT_MIN_CANDIDATES
    query_expansion: int = DEFAULT_QUERY_EXPANSION


@dataclass(frozen=True)
class Scores:
    """Mean quality of one way of searching, over all queries."""

    map: float
    p_at_1: float
    p_at_5: float
    p_at_10: float
    r_at_10: float
    rows_searched: float  # mean rows compared per query (its own row among them)
    rows_share: float  # rows_searched over the database's images
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
    # image id of each query -> the ids of its gated top 10, as cbir query ranks them
    top10: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def map_ratio(self) -> float:
        """Gated mAP as a share of exhaustive mAP."""
        return self.gated.map / self.exhaustive.map if self.exhaustive.map > 0 else 1.0

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("top10")
        data["map_ratio"] = self.map_ratio
        return data


@dataclass
class Tally:
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
    def new(cls) -> Tally:
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
            rows / max(n_rows, 1), float(np.mean(self.none_relevant)),
        )  # fmt: skip


def evaluate_db(
    db: Database, labels: Mapping[int, str], settings: SearchSettings, use_head: bool = True,
    queries: Sequence[int] | None = None,
) -> Evaluation:
    """Every labelled image of `db` (image id -> label), or those of `queries`, queried
    against the database, gated and exhaustively, through cbir.query.rank_described: the path
    `cbir query`, the API and the server take, by the image's stored feature, the image
    itself left out; each ranking DEPTH rows deep. Queries without another image of their
    label are left out."""
    from cbir.query import QueryOptions, ResidentMatrix, rank_described, stored_query

    with db.catalog.snapshot():
        n = db.n_images()
        options = QueryOptions(n_results=DEPTH, min_candidates=settings.min_candidates,
                               query_expansion=settings.query_expansion,
                               use_head=use_head)  # fmt: skip
        resident = ResidentMatrix(db.settings.feature_dim) if ResidentMatrix.fits(db) else None
        if resident is not None:
            resident.refresh(db)
        members = CategoryMembers(db)
        records = {i: db.image(i) for i in labels}
        label_of_row = np.full(db.matrix().n_rows, "", dtype=object)
        for image_id, record in records.items():
            if record is not None:
                label_of_row[record.row] = labels[image_id]
        gated, exhaustive = Tally.new(), Tally.new()
        queried: list[int] = []
        for image_id in labels if queries is None else queries:
            record = records[image_id]
            if record is None:
                continue
            relevant = label_of_row == labels[image_id]
            relevant[record.row] = False
            if not relevant.any():
                continue
            probs, feature = stored_query(db, record)
            for tally, search_all in ((gated, False), (exhaustive, True)):
                found = rank_described(db, probs, feature, members,
                                       replace(options, search_all=search_all, exact=True),
                                       resident=resident, exclude_id=image_id)  # fmt: skip
                tally.add(found.ranked.positions, relevant, found.n_searched)
            queried.append(image_id)
        if not queried:
            raise CbirError("no query has a relevant image: every label needs at least two images")
        ids_of = db.catalog.ids_of_rows(np.concatenate(gated.top).tolist())
    kept = [len(np.intersect1d(g, e)) / max(len(e), 1)
            for g, e in zip(gated.top, exhaustive.top, strict=True)]  # fmt: skip
    return Evaluation(
        n_images=n, n_queries=len(queried), n_labels=len(set(labels.values())),
        settings=settings, gated=gated.scores(n), exhaustive=exhaustive.scores(n),
        top10_kept=float(np.mean(kept)),
        top10={q: tuple(ids_of[r] for r in top.tolist())
               for q, top in zip(queried, gated.top, strict=True)},
    )  # fmt: skip


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
    except UnicodeDecodeError as exc:
        raise CbirError(f"{groups_file} is not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise CbirError(f"{groups_file} is not a CSV of path,group rows ({exc})") from None
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


# -- the runner: a database, temporary or given ---------------------------------------------


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
    temporary database, or use `db_dir`, then query every labelled image against the rest
    (evaluate_db)."""
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
    """Evaluate the labelled images a database holds (by their source paths); no model is
    needed: queries are the images' stored features."""
    with Database.open(db_dir) as db:
        built_with = db.settings.backbone
        if options.backbone is not None and options.backbone != built_with:
            raise CbirError(f"{db_dir} was built with {built_with}, not {options.backbone}")
        by_id: dict[int, str] = {}
        indexed = set()
        for path, record in db.paths():
            if path in labels:
                indexed.add(path)
                label = labels[path]
                if label is not None:
                    by_id.setdefault(record.image_id, label)
        if not by_id:
            raise CbirError(f"none of the labelled images is in the database {db_dir}")
        search = replace(options.search, top_k=db.settings.top_k)
        evaluation = evaluate_db(db, by_id, search, options.use_head)
        head = db.head_provenance() if options.use_head and db.centre() is not None else None
        gated_by = "lists" if db.centre() is not None and db.ivf() is not None else "categories"
        return RunReport(evaluation, built_with, db.settings.pooling,
                         len(labels) - len(indexed), head, gated_by)  # fmt: skip
