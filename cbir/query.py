"""cbir query: describe each query image, open the categories it selects, rank their images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir import categories
from cbir.errors import BadImage, CbirError
from cbir.images import load_image
from cbir.model import Model, get_backbone, load_model, resolve_weights
from cbir.search import (
    DEFAULT_MIN_CANDIDATES,
    DEFAULT_QUERY_EXPANSION,
    Gating,
    choose_categories,
    top_matches,
)
from cbir.store import CategoryMembers, Database, check_compatible


@dataclass(frozen=True)
class Category:
    wnid: str
    name: str
    prob: float


@dataclass(frozen=True)
class Hit:
    path: str  # the image's original source path
    score: float  # cosine similarity to the query
    image_id: int
    wnids: tuple[str, ...]  # the categories it is stored in
    stored_path: Path  # its copy in the database


@dataclass(frozen=True)
class QueryResult:
    query_path: Path
    categories: tuple[Category, ...]  # the query's own top-k predictions
    gating: Gating
    n_searched: int  # rows compared
    hits: tuple[Hit, ...]


@dataclass(frozen=True)
class QueryOptions:
    n_results: int = 10
    search_all: bool = False
    min_candidates: int = DEFAULT_MIN_CANDIDATES
    query_expansion: int = DEFAULT_QUERY_EXPANSION
    engine: str = "auto"
    precision: str = "auto"


def open_for_query(
    db_dir: Path, options: QueryOptions, backbone: str | None = None, weights: str | None = None
) -> tuple[Database, Model]:
    """Open the database and load its model; another backbone or weights is refused."""
    db = Database.open(db_dir)
    built_with = db.settings
    backbone = backbone or built_with.backbone
    if weights is None:
        if built_with.weights.startswith("sha256:"):
            raise CbirError(
                f"{db_dir} was built with a weights file ({built_with.weights}); "
                "pass the same file with --weights FILE"
            )
        weights = built_with.weights
    spec = resolve_weights(get_backbone(backbone), weights)
    check_compatible(db_dir, built_with, backbone, spec.identity)
    return db, load_model(backbone, weights, options.engine, options.precision)


def run_queries(
    db: Database, model: Model, query_paths: list[Path], options: QueryOptions
) -> list[QueryResult | BadImage]:
    """One result per query image; a query that cannot be decoded gives its BadImage."""
    size = model.backbone.input_size
    loaded: list[tuple[Path, np.ndarray]] = []
    outcome: dict[Path, QueryResult | BadImage] = {}
    for path in query_paths:
        try:
            loaded.append((path, load_image(path, size, resize=db.settings.resize)))
        except BadImage as bad:
            outcome[path] = bad
    if loaded:
        described = model.describe(np.stack([pixels for _, pixels in loaded]))
        members = db.category_members()
        for i, (path, _) in enumerate(loaded):
            feature = described.features[db.settings.pooling][i]
            outcome[path] = _search(db, path, described.probs[i], feature, members, options)
    return [outcome[p] for p in query_paths]


def _search(
    db: Database,
    path: Path,
    probs: np.ndarray,
    feature: np.ndarray,
    members: CategoryMembers,
    options: QueryOptions,
) -> QueryResult:
    wnids = categories.wnids()
    names = categories.names_by_wnid()
    k = db.settings.top_k
    top = np.argsort(-probs)[:k]
    own = tuple(Category(wnids[j], names[wnids[j]], float(probs[j])) for j in top)
    if options.search_all:
        gating = Gating(tuple(sorted(members)), fell_back=False, widened=False)
    else:
        gating = choose_categories(probs, wnids, members, k, options.min_candidates)
    rows = db.read_categories(gating.wnids, members)
    best, scores = top_matches(feature, rows.features, options.n_results, options.query_expansion)
    hits = []
    for i, score in zip(best, scores, strict=True):
        image_id = int(rows.ids[i])
        stored_in = db.wnids_of(image_id)
        stored_path = db.category_dir(stored_in[0]) / str(rows.files[i])
        hits.append(Hit(str(rows.paths[i]), float(score), image_id, stored_in, stored_path))
    return QueryResult(path, own, gating, len(rows), tuple(hits))
