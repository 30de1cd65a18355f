"""cbir query: describe each query image, gather the rows its categories hold, rank them.

A gated query reads only its candidates' rows of the search matrix; `--all` reads the matrix
once, in blocks. Either way a hit's source paths come from the catalog, never from a copy.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.centring import directed
from cbir.db import Database, check_compatible, ivf
from cbir.db.catalog import ImageRecord
from cbir.db.database import CategoryMembers
from cbir.db.matrix import SCAN_BLOCK_ROWS, SearchMatrix
from cbir.errors import BadImage, CbirError
from cbir.hashing import image_id_of
from cbir.images import DEFAULT_MAX_MEGAPIXELS, load_image, read_source
from cbir.model import Descriptions, Model, get_backbone, load_model, resolve_weights
from cbir.ranking import CentredRows, Float16Rows, Ranked, rank, rank_by, top_rows
from cbir.search import (
    DEFAULT_MIN_CANDIDATES,
    DEFAULT_QUERY_EXPANSION,
    Gating,
    choose_categories,
)

QUERY_BATCH = 8  # query images described at once: 20 at once cost 175 MB more than one


@dataclass(frozen=True)
class Category:
    wnid: str
    name: str
    prob: float


@dataclass(frozen=True)
class Hit:
    path: str  # the image's first source path (its stored copy if the catalog lost them)
    score: float  # what it was ranked by (centred, expanded cosine): falls down the list
    id: int  # the image's id in the catalog (from its content hash)
    categories: tuple[str, ...]  # wnids of the categories it is stored in, most probable first
    stored_path: Path  # its copy in the database
    paths: tuple[str, ...]  # every source path of its content
    cosine: float  # its plain cosine similarity to the query


@dataclass(frozen=True)
class QueryResult:
    query_path: Path
    categories: tuple[Category, ...]  # the query's own top-k predictions
    gating: Gating
    n_searched: int  # rows compared
    hits: tuple[Hit, ...]
    method: str = "gated"  # "gated" (its categories), "exact" (every row) or "ivf" (--all, ANN)


@dataclass(frozen=True)
class QueryOptions:
    n_results: int = 10
    search_all: bool = False
    min_candidates: int = DEFAULT_MIN_CANDIDATES
    query_expansion: int = DEFAULT_QUERY_EXPANSION
    engine: str = "auto"
    precision: str = "auto"
    exact: bool = False  # --all compares every row even where the database has an IVF
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    nprobe: int | None = None  # IVF lists an approximate --all searches (None: the default)
    min_score: float = -1.0  # hits of a lower plain cosine (Hit.cosine, which does not move
    # as the database's mean does) are left out
    use_head: bool = True  # map queries by the database's query head, if trained (cbir train)
    exclude_self: bool = False  # leave out the query's own content (by its SHA-256), if held


def open_for_query(
    db_dir: Path, options: QueryOptions, backbone: str | None = None, weights: str | None = None
) -> tuple[Database, Model]:
    """Open the database and load its model; another backbone or weights is refused."""
    db = Database.open(db_dir)
    return db, open_model(db, backbone, weights, options.engine, options.precision)


def open_model(
    db: Database, backbone: str | None, weights: str | None, engine: str, precision: str
) -> Model:
    """The model `db` was built with (memoised per process); another one is refused."""
    built_with = db.settings
    backbone = backbone or built_with.backbone
    if weights is None:
        if built_with.weights.startswith("sha256:"):
            raise CbirError(
                f"{db.db_dir} was built with a weights file ({built_with.weights}); "
                "pass the same file with --weights FILE"
            )
        weights = built_with.weights
    spec = resolve_weights(get_backbone(backbone), weights)
    check_compatible(db.db_dir, built_with, backbone, spec.identity)
    return load_model(backbone, weights, engine, precision)


def run_queries(
    db: Database, model: Model, query_paths: list[Path], options: QueryOptions
) -> list[QueryResult | BadImage]:
    """One result per query image; a query that cannot be decoded gives its BadImage."""
    size = model.backbone.input_size
    loaded: list[DecodedQuery] = []
    outcome: dict[Path, QueryResult | BadImage] = {}
    for path in query_paths:
        try:
            data = read_source(path)
            pixels = load_image(path, size, data, max_megapixels=options.max_megapixels,
                                resize=db.settings.resize)  # fmt: skip
            loaded.append((path, pixels, content_id(data)))
        except BadImage as bad:
            outcome[path] = bad
    for query, result in zip(loaded, search_pixels(db, model, loaded, options), strict=True):
        outcome[query[0]] = result
    return [outcome[p] for p in query_paths]


# A query ready to search: (its name, (s, s, 3) uint8 pixels, the image id its content would
# have in a database, None where it has no file content: an array).
DecodedQuery = tuple[Path, npt.NDArray[np.uint8], "int | None"]


def content_id(data: bytes) -> int:
    """The id an image with these bytes has in any database (cbir.hashing.image_id_of)."""
    return image_id_of(hashlib.sha256(data).hexdigest())


def search_pixels(
    db: Database, model: Model, loaded: list[DecodedQuery], options: QueryOptions,
    resident: ResidentMatrix | None = None,
) -> list[QueryResult]:
    """Describe decoded queries and rank the database for each, all against one committed
    state of the catalog."""
    if not loaded:
        return []
    return search_described(db, loaded, describe(model, loaded), options, resident)


def describe(model: Model, loaded: list[DecodedQuery]) -> Descriptions:
    """The model's classes and features of decoded queries, QUERY_BATCH at a time."""
    return model.describe_in_batches([pixels for _, pixels, _ in loaded], QUERY_BATCH)


def search_described(
    db: Database, loaded: list[DecodedQuery], described: Descriptions, options: QueryOptions,
    resident: ResidentMatrix | None = None,
) -> list[QueryResult]:
    """Rank the database for each described query, against one committed catalog state."""
    if not loaded:
        return []
    with db.catalog.snapshot():
        if resident is not None:
            resident.refresh(db)
        members = CategoryMembers(db)
        pool, gatings = None, [None] * len(loaded)
        features = described.features[db.settings.pooling]
        if len(loaded) > 1 and not options.search_all and resident is None:
            gatings = [choose(db, p, f, members, options)
                       for p, f in zip(described.probs, features, strict=True)]  # fmt: skip
            pool = CandidatePool(db)
            pool.gather([gated_rows(g, members) for g in gatings])
        return [search(db, path, described.probs[i], features[i],
                       members, options, pool, gatings[i], resident,
                       own_id if options.exclude_self else None)
                for i, (path, _, own_id) in enumerate(loaded)]  # fmt: skip


def search_like(
    db: Database, image_id: int, options: QueryOptions, resident: ResidentMatrix | None = None
) -> QueryResult | None:
    """"More like this": rank the database for an image it holds, by its stored feature and
    categories (no decoding, no model), leaving the image itself out. None if not held."""
    with db.catalog.snapshot():
        if resident is not None:
            resident.refresh(db)
        record = db.image(image_id)
        if record is None:
            return None
        probs, feature = stored_query(db, record)
        sources = db.paths_of(image_id)
        label = Path(sources[0]) if sources else db.stored_path(record)
        return search(db, label, probs, feature, CategoryMembers(db), options,
                      resident=resident, exclude_id=image_id)  # fmt: skip


def stored_query(
    db: Database, record: ImageRecord
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(probs (1000,), feature (d,) unit-norm) of an image the database holds, as a query:
    its stored feature and its categories' probabilities (the others 0)."""
    feature = db.matrix().gather(np.array([record.row]))[0]
    feature /= max(float(np.linalg.norm(feature)), 1e-12)
    probs = np.zeros(len(categories.wnids()), np.float32)
    index = categories.index_by_wnid()
    for wnid, prob in zip(record.wnids, record.probs, strict=True):
        probs[index[wnid]] = prob
    return probs, feature


class ResidentMatrix:
    """The whole search matrix held in memory by a long-lived reader (the server), kept in
    step with commits: new rows are read as they are committed, a compacted matrix is read
    anew. A query then ranks its categories' rows where they lie (a FAISS selector over the
    rows) instead of gathering them, and the categories' rows from the catalog are kept
    until the next commit. On the 60k Fashion-MNIST database this took a warm gated query
    (22k rows searched) from 133 ms to 38 ms, and one by id from 93 ms to 13 ms (2 cores);
    it costs 2 d bytes per row (154 MB at 60k, d = 1280), so it is used up to MAX_BYTES."""

    MAX_BYTES = 1 << 30

    def __init__(self, dim: int) -> None:
        self.rows = Float16Rows(dim)
        self._generation = -1
        self._read = 0  # rows of that generation in memory
        self._state: tuple[int, int, int] | None = None  # (generation, rows, images)
        self._by_unit: dict[str | int, npt.NDArray[np.int64]] = {}  # wnid or list -> rows
        self._live: npt.NDArray[np.int64] | None = None  # the rows of every image, sorted
        # the rows centred on a mean, for --all, with that mean (d,)
        self._centred: tuple[npt.NDArray[np.float32], CentredRows] | None = None

    @classmethod
    def fits(cls, db: Database) -> bool:
        return db.catalog.matrix_state()[1] * 2 * db.settings.feature_dim <= cls.MAX_BYTES

    def refresh(self, db: Database) -> None:
        """Catch up with the committed state (call inside the query's catalog snapshot)."""
        generation, n_rows = db.catalog.matrix_state()
        state = (generation, n_rows, db.n_images())
        if state == self._state:
            return
        self._by_unit.clear()
        self._live = None
        self._centred = None
        have = self._read if generation == self._generation and n_rows >= self._read else 0
        self._read, self._state = 0, None  # until every row is in (a failed read: all again)
        matrix = db.matrix()
        view = self.rows.buffer(n_rows)
        for start in range(have, n_rows, SCAN_BLOCK_ROWS):
            matrix.read_codes(start, view[start : min(start + SCAN_BLOCK_ROWS, n_rows)])
        self._generation, self._state, self._read = generation, state, n_rows

    def gated_rows(self, db: Database, gating: Gating) -> npt.NDArray[np.int64]:
        """The sorted rows a gated query searches (its categories' or lists'), each once."""
        keys: list[str | int] = list(gating.lists or gating.wnids)
        for key in keys:
            if key not in self._by_unit:
                self._by_unit[key] = db.catalog.rows_of_lists([key]) if isinstance(key, int) \
                    else db.catalog.rows_of_categories([key])  # fmt: skip
        if len(keys) == 1:
            return self._by_unit[keys[0]]
        return np.unique(np.concatenate([np.zeros(0, np.int64),
                                         *(self._by_unit[k] for k in keys)]))  # fmt: skip

    def live_rows(self, db: Database) -> npt.NDArray[np.int64]:
        """The sorted rows of every committed image."""
        if self._live is None:
            self._live = db.catalog.all_rows()[1]
        return self._live

    def rank_all(
        self, db: Database, query: npt.NDArray[np.float32], n: int, expansion: int,
        mean: npt.NDArray[np.float32] | None, head: npt.NDArray[np.float32] | None,
    ) -> Ranked:
        """The best of every committed image's row (an exact --all), by matrix row: scanned
        in a copy of the rows centred on the mean (CentredRows), made on the first such query
        after a commit (0.5 s for 60k rows), when it fits MAX_BYTES beside the rows."""
        live = self.live_rows(db)
        if mean is None or 2 * self.rows.index.code_size * len(self.rows) > self.MAX_BYTES:
            return self.rank(live, query, n, expansion, mean, head)
        if self._centred is None or not np.array_equal(self._centred[0], mean):
            self._centred = mean.copy(), CentredRows(self.rows, mean)
        centred_rows = self._centred[1]
        only = None if len(live) == len(self.rows) else live
        return rank_by(lambda probe, k: centred_rows.top(probe, k, only), self.rows.rows,
                       len(live), query, n, expansion, mean, head)  # fmt: skip

    def rank(
        self, rows: npt.NDArray[np.int64], query: npt.NDArray[np.float32], n: int,
        expansion: int, mean: npt.NDArray[np.float32] | None,
        head: npt.NDArray[np.float32] | None,
    ) -> Ranked:
        """The best of the candidate rows (sorted), best first, by matrix row."""
        everything = len(rows) == len(self.rows)
        return rank(self.rows, query, n, expansion, None if everything else rows, mean, head)


class CandidatePool:
    """The rows a batch of queries searches, gathered once into one FAISS index; each query
    then ranks only its own candidates in it (a selector), with the same result as gathering
    them alone. Fashion-MNIST's 20 test queries search 20-40k rows each, mostly the same
    ones: gathering them once instead of 20 times is most of the work saved. A pool larger
    than POOL_ROWS is not made (queries gather their own)."""

    POOL_ROWS = 150_000

    def __init__(self, db: Database) -> None:
        self.db = db
        self.rows = np.zeros(0, np.int64)  # the pool's rows, sorted
        self.index: Float16Rows | None = None

    def gather(self, candidates: list[npt.NDArray[np.int64]]) -> None:
        """Gather the union of every query's candidate rows (each (r,) sorted)."""
        if not candidates:
            return
        rows = np.unique(np.concatenate(candidates))
        if len(rows) > self.POOL_ROWS:
            return
        self.rows = rows
        self.index = Float16Rows(self.db.settings.feature_dim)
        self.db.matrix().gather_codes(self.rows, self.index.buffer(len(self.rows)))

    def rank(
        self, rows: npt.NDArray[np.int64], query: npt.NDArray[np.float32], n: int,
        expansion: int, mean: npt.NDArray[np.float32] | None,
        head: npt.NDArray[np.float32] | None,
    ) -> Ranked | None:
        """The best of the candidate `rows` (sorted), by matrix row; None if not pooled."""
        if self.index is None:
            return None
        positions = np.searchsorted(self.rows, rows)
        if len(rows) and (positions[-1] >= len(self.rows)
                          or not np.array_equal(self.rows[positions], rows)):  # fmt: skip
            return None
        everything = len(positions) == len(self.rows)
        ranked = rank(self.index, query, n, expansion, None if everything else positions, mean,
                      head)  # fmt: skip
        return ranked.at(self.rows)


def choose(
    db: Database, probs: npt.NDArray[np.float32], feature: npt.NDArray[np.float32],
    members: CategoryMembers, options: QueryOptions,
) -> Gating:
    """What a gated query with class probabilities `probs` (1000,) and feature (d,)
    searches: the inverted lists by centroid cosine where the database has them (cbir.db.ivf),
    else its categories by centred centroid cosine (cbir.centring), or by probability in a
    database too small to centre; the centred query mapped by the query head, if trained."""
    inverted, centre = db.ivf(), db.centre()
    if inverted is not None and centre is not None:
        probe = directed(inverted.probe(feature), db.query_head())
        lists = members.lists_until(inverted.order(probe), options.min_candidates)
        return Gating((), False, "lists", (ivf.NEW_ROWS, *lists))  # new rows: always searched
    wnids = categories.wnids()
    own = [wnids[i] for i in np.argsort(-probs)]
    fell_back = not any(w in members for w in own[: db.settings.top_k])
    if centre is None:
        order, how = own, "probability"
    else:
        probe = directed(centre.query(feature), db.query_head())
        order, how = centre.category_order(probe), "centroids"
    members.read_ahead(order, options.min_candidates)
    chosen = choose_categories(order, members, options.min_candidates, members.sizes)
    return Gating(chosen, fell_back and bool(chosen), how)


@dataclass(frozen=True)
class Ranking:
    """What a described query found: its best matrix rows with their scores (ranked.positions
    are matrix rows), how many rows it compared, what it searched and how."""

    ranked: Ranked
    n_searched: int
    gating: Gating
    method: str  # "gated", "exact" or "ivf" (QueryResult.method)


def rank_described(
    db: Database,
    probs: npt.NDArray[np.float32],
    feature: npt.NDArray[np.float32],
    members: CategoryMembers,
    options: QueryOptions,
    pool: CandidatePool | None = None,
    gating: Gating | None = None,
    resident: ResidentMatrix | None = None,
    exclude_id: int | None = None,
) -> Ranking:
    """The one query path of cbir: every front end (query, the API, the server, evaluate)
    ranks a described query here. probs (1000,), feature (d,) unit-norm; `pool`: candidates
    gathered for a batch of queries (see CandidatePool), with `gating`, what was already
    chosen for this query; `resident`: the matrix in memory, up to date (a server's);
    `exclude_id`: an image left out (the query itself). Gated: the inverted file's lists
    and its new rows, or categories by centroid (choose); `--all`: every row, or the IVF's
    nearest lists from APPROXIMATE_ALL_MIN_IMAGES. Ranked by cbir.ranking.rank_by (centred,
    head, expansion): options.n_results rows, those of a cosine below options.min_score left
    out."""
    exclude_row = None
    if exclude_id is not None:
        record = db.image(exclude_id)
        exclude_row = None if record is None else record.row
    n = options.n_results + (exclude_row is not None)
    centre = db.centre()
    mean = None if centre is None else centre.mean
    head = None if centre is None or not options.use_head else db.query_head()
    expansion = options.query_expansion
    method = "gated"
    rows: npt.NDArray[np.int64] | None = None  # None: every live row
    if options.search_all:
        gating = Gating(tuple(sorted(members)), fell_back=False, order="all")
        inverted = None if options.exact or centre is None \
            or db.catalog.ivf_state()[1] < ivf.APPROXIMATE_ALL_MIN_IMAGES else db.ivf()  # fmt: skip
        method = "exact" if inverted is None else "ivf"
        if inverted is not None:
            nprobe = options.nprobe or max(1, round(len(inverted) * ivf.DEFAULT_PROBE_SHARE))
            lists = inverted.nearest(directed(inverted.probe(feature), head), nprobe)[0]
            rows = db.catalog.rows_of_lists([ivf.NEW_ROWS, *lists.tolist()])
    else:
        gating = gating or choose(db, probs, feature, members, options)
        rows = resident.gated_rows(db, gating) if resident is not None \
            else gated_rows(gating, members)  # fmt: skip
    pooled = None if pool is None or rows is None else \
        pool.rank(rows, feature, n, expansion, mean, head)  # fmt: skip
    if rows is None and resident is not None:
        ranked = resident.rank_all(db, feature, n, expansion, mean, head)
    elif rows is None:
        ranked = exhaustive(db, feature, n, expansion, mean, head)
    elif resident is not None:
        ranked = resident.rank(rows, feature, n, expansion, mean, head)
    elif pooled is not None:
        ranked = pooled
    else:
        ranked = rank_candidates(db, rows, feature, n, expansion, mean, head)
    keep = ranked.cosines >= options.min_score
    if exclude_row is not None:
        keep &= ranked.positions != exclude_row
    n_searched = db.n_images() if rows is None else len(rows)
    return Ranking(ranked.take(keep).take(slice(options.n_results)), n_searched, gating, method)


def search(
    db: Database,
    path: Path,
    probs: npt.NDArray[np.float32],
    feature: npt.NDArray[np.float32],
    members: CategoryMembers,
    options: QueryOptions,
    pool: CandidatePool | None = None,
    gating: Gating | None = None,
    resident: ResidentMatrix | None = None,
    exclude_id: int | None = None,
) -> QueryResult:
    """rank_described, with the hits' paths and categories from the catalog."""
    ranking = rank_described(db, probs, feature, members, options, pool, gating, resident,
                             exclude_id)  # fmt: skip
    wnids = categories.wnids()
    names = categories.names_by_wnid()
    top = np.argsort(-probs)[: db.settings.top_k]
    own = tuple(Category(wnids[j], names[wnids[j]], float(probs[j])) for j in top)
    found = hits_at_rows(db, ranking.ranked)
    return QueryResult(path, own, ranking.gating, ranking.n_searched, tuple(found),
                       ranking.method)  # fmt: skip


def gated_rows(gating: Gating, members: CategoryMembers) -> npt.NDArray[np.int64]:
    """(r,) the sorted matrix rows a gated query searches, each once."""
    if gating.lists:
        return members.rows_of_lists(gating.lists)
    return np.unique(np.concatenate([np.zeros(0, np.int64),
                                     *(members[w] for w in gating.wnids)]))  # fmt: skip


def rank_candidates(
    db: Database, rows: npt.NDArray[np.int64], query: npt.NDArray[np.float32], n: int,
    expansion: int, mean: npt.NDArray[np.float32] | None,
    head: npt.NDArray[np.float32] | None = None,
) -> Ranked:
    """The n best of the candidate matrix rows (r,) (sorted), gathered, by matrix row."""
    with _candidate_rows(db.settings.feature_dim, len(rows)) as candidates:
        db.matrix().gather_codes(rows, candidates.buffer(len(rows)))
        return rank(candidates, query, n, expansion, mean=mean, head=head).at(rows)


SCRATCH_BYTES = 256 << 20  # candidates up to this size (100k rows of 1280) reuse one buffer
_scratch: dict[int, Float16Rows] = {}  # by dimension: the process's reused candidate buffer
_scratch_lock = threading.Lock()


@contextmanager
def _candidate_rows(dim: int, n: int) -> Iterator[Float16Rows]:
    """A Float16Rows to gather n candidates into: the process's one reused buffer when it is
    free and n fits, because a fresh one's page faults cost 46 ms per query for the 41k rows
    of an approximate --all at 1M (a fresh 41 MB one: 22 ms). One buffer, not one per thread,
    so that a pool of query threads never holds more than SCRATCH_BYTES."""
    if n * 2 * dim > SCRATCH_BYTES or not _scratch_lock.acquire(blocking=False):
        yield Float16Rows(dim)
        return
    try:
        if dim not in _scratch:
            _scratch.clear()
            _scratch[dim] = Float16Rows(dim)
        yield _scratch[dim]
    finally:
        _scratch_lock.release()


def hits(db: Database, ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32]) -> list[Hit]:
    """Results for image ids with scores (k,) (their cosines too), with their paths and
    categories from the catalog."""
    records = [db.image(i) for i in ids.tolist()]
    return _hits(db, records, scores, scores)


def hits_at_rows(db: Database, ranked: Ranked) -> list[Hit]:
    """Results for ranked matrix rows (a row of no image, e.g. a removed one's, is left out)."""
    by_row = db.catalog.images_at_rows(ranked.positions.tolist())
    return _hits(db, [by_row.get(r) for r in ranked.positions.tolist()], ranked.scores,
                 ranked.cosines)  # fmt: skip


def _hits(
    db: Database, records: list[ImageRecord | None], scores: npt.NDArray[np.float32],
    cosines: npt.NDArray[np.float32],
) -> list[Hit]:
    found = []
    for record, score, cosine in zip(records, scores.tolist(), cosines.tolist(), strict=True):
        if record is None:  # removed since the rows were read
            continue
        stored = db.stored_path(record)
        paths = tuple(db.paths_of(record.image_id))
        found.append(Hit(paths[0] if paths else str(stored), float(score), record.image_id,
                         record.wnids, stored, paths, float(cosine)))  # fmt: skip
    return found


def exhaustive(
    db: Database, query: npt.NDArray[np.float32], n: int, expansion: int,
    mean: npt.NDArray[np.float32] | None = None, head: npt.NDArray[np.float32] | None = None,
) -> Ranked:
    """The n best images of the whole database by matrix row, ranked by rank_by; each of its
    passes reads the matrix once, a block at a time."""
    return rank_by(lambda probe, k: _live_top(db, probe, k, mean), db.matrix().gather,
                   db.n_images(), query, n, expansion, mean, head)  # fmt: skip


def _live_top(
    db: Database, probe: npt.NDArray[np.float32], k: int, mean: npt.NDArray[np.float32] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(scores, rows) of the k best rows, best first, that a committed image owns. Dead rows
    (of removed images) are passed over: the scan asks for more rows until k live ones are
    in."""
    matrix = db.matrix()
    dead = max(matrix.n_rows - db.n_images(), 0)
    want = k + min(dead, 4 * k)
    while True:
        scores, rows = _scan(matrix, probe, want, mean)
        owned = db.catalog.ids_of_rows(rows.tolist())
        live = np.array([r in owned for r in rows.tolist()], bool)
        if live.sum() >= k or want >= matrix.n_rows:
            return scores[live][:k], rows[live][:k]
        want *= 4


def _scan(
    matrix: SearchMatrix, probe: npt.NDArray[np.float32], k: int,
    mean: npt.NDArray[np.float32] | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(scores, rows) of the k rows most similar to `probe` (centred on `mean` when given),
    best first: the matrix is read once, a block at a time, and only k candidates are kept
    between blocks."""
    block = Float16Rows(matrix.dim)
    rows, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, matrix.n_rows, SCAN_BLOCK_ROWS):
        n = min(SCAN_BLOCK_ROWS, matrix.n_rows - start)
        matrix.read_codes(start, block.buffer(n))
        block_scores, positions = top_rows(block, probe, k, mean=mean)
        rows = np.concatenate([rows, positions + start])
        scores = np.concatenate([scores, block_scores])
        order = np.argsort(-scores, kind="stable")[:k]
        rows, scores = rows[order], scores[order]
    return scores, rows
