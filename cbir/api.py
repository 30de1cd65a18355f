"""The Python API: the small front that the CLI, the server and the tests use.

    import cbir

    cbir.create_db("photos", "photos.db", model="efficientnet_lite0")
    db = cbir.open_db("photos.db")
    result = db.query("holiday.jpg", n=5)
    for hit in result.hits:
        print(hit.score, hit.path, hit.id, hit.categories)

Options are given once: an existing database supplies its own settings (backbone, weights,
top-k, pooling, link) and refuses others. The model loads on the first query that needs it and
stays loaded (once per process, whatever the number of opened databases).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from cbir import categories
from cbir.db import FORMAT_VERSION, Database, ivf
from cbir.errors import BadImage, CbirError
from cbir.images import DEFAULT_MAX_MEGAPIXELS, load_image, model_input, read_source
from cbir.indexing import Callbacks, IndexOptions, IndexReport, Removal, index_paths
from cbir.indexing import remove_sources as _remove_sources
from cbir.indexing import sync as _sync
from cbir.query import (
    DecodedQuery,
    Hit,
    QueryOptions,
    QueryResult,
    ResidentMatrix,
    content_id,
    describe,
    search_described,
    search_like,
)
from cbir.search import DEFAULT_MIN_CANDIDATES, DEFAULT_QUERY_EXPANSION
from cbir.training import TrainOptions, TrainReport
from cbir.training import reset as _reset_training
from cbir.training import train as _train

__all__ = ["ImageDatabase", "Hit", "QueryResult", "IndexReport", "Removal", "create_db",
           "open_db", "result_json"]  # fmt: skip

# What a query may be: a file's path, its bytes, an (h, w, 3) or (h, w) uint8 array, or a
# Pillow image.
ImageInput = str | os.PathLike | bytes | npt.NDArray[np.uint8] | Image.Image
PathsInput = str | os.PathLike | Sequence[str | os.PathLike]


def create_db(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    db_dir: str | os.PathLike,
    *,
    model: str | None = None,
    weights: str | None = None,
    top_k: int | None = None,
    link: str | None = None,
    pooling: str | None = None,
    engine: str = "auto",
    precision: str = "auto",
    on_skip: Callable[[BadImage], None] | None = None,
) -> IndexReport:
    """Index every image under `source` (a folder, or several paths) into `db_dir`, creating
    it if needed. Settings left None are the database's own, else the defaults
    (inception_resnet_v2, ImageNet weights, top-4, copies)."""
    options = IndexOptions(backbone=model, weights=weights, top_k=top_k, link=link,
                           pooling=pooling, engine=engine, precision=precision)  # fmt: skip
    callbacks = Callbacks(on_skip=on_skip) if on_skip else None
    return index_paths(Path(db_dir), _paths(source), options, callbacks)


def open_db(
    db_dir: str | os.PathLike,
    *,
    weights: str | None = None,
    engine: str = "auto",
    precision: str = "auto",
    in_memory: bool = False,
) -> ImageDatabase:
    """Open an existing database. `weights`: the weights file a database built with one
    needs for queries (it is recorded by its hash only). `in_memory`: keep the search matrix
    in memory for fast repeated queries (a server; 2 bytes per image and feature value, and
    only up to cbir.query.ResidentMatrix.MAX_BYTES)."""
    return ImageDatabase(Database.open(Path(db_dir)), weights, engine, precision, in_memory)


@dataclass(frozen=True)
class CategoryInfo:
    id: str  # the ImageNet wnid, e.g. "n02124075"
    name: str  # e.g. "Egyptian_cat"
    images: int  # how many images are stored in it


@dataclass(frozen=True)
class ImageInfo:
    id: int
    path: str  # its first source path
    paths: tuple[str, ...]  # every source path of its content
    categories: tuple[str, ...]  # wnids, most probable first
    probs: tuple[float, ...]  # their probabilities


class ImageDatabase:
    """An opened database. Safe to share between threads (calls take turns); `close()` or
    `with` releases its files. Each call sees the database as last committed, so images a
    `cbir add` beside it commits are found without reopening."""

    def __init__(
        self, db: Database, weights: str | None, engine: str, precision: str, in_memory: bool
    ) -> None:
        self._db = db
        self._in_memory = in_memory
        self._resident: ResidentMatrix | None = None
        self._weights = weights
        self._engine = engine
        self._precision = precision
        self._model: Any = None
        self._lock = threading.RLock()  # the catalog, the matrix and the resident copy
        self._model_lock = threading.Lock()  # one inference at a time

    def __enter__(self) -> ImageDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def db_dir(self) -> Path:
        return self._db.db_dir

    @property
    def database(self) -> Database:
        """The reader underneath (cbir.db), for what this front does not offer."""
        return self._db

    def model(self) -> Any:
        """The database's own model (cbir.model.Model), loaded on first use."""
        from cbir.query import open_model

        with self._lock:
            if self._model is None:
                self._model = open_model(self._db, None, self._weights, self._engine,
                                         self._precision)  # fmt: skip
            return self._model

    # -- searching --------------------------------------------------------------------------

    def query(
        self,
        image: ImageInput,
        n: int = 10,
        all: bool = False,  # noqa: A002 (the CLI's --all)
        *,
        exact: bool = False,
        min_candidates: int = DEFAULT_MIN_CANDIDATES,
        query_expansion: int = DEFAULT_QUERY_EXPANSION,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        min_score: float = -1.0,
        exclude_self: bool = False,
        name: str | None = None,
    ) -> QueryResult:
        """The n images most similar to `image`, best first. `all`: search every category
        (approximately on a database large enough to have an inverted file, unless `exact`);
        `min_score`: leave out hits of a lower cosine; `exclude_self`: leave out an image
        with the query's own content (a file or bytes, by SHA-256). Raises BadImage (a
        CbirError) if the image cannot be decoded."""
        options = _options(n, all, exact, min_candidates, query_expansion, max_megapixels,
                           min_score, exclude_self)  # fmt: skip
        decoded = self._decoded(image, name, options)
        return self._search([decoded], options)[0]

    def query_many(
        self, images: Iterable[ImageInput], n: int = 10, all: bool = False, **kwargs: Any  # noqa: A002
    ) -> list[QueryResult | BadImage]:
        """`query` for several images at once (their shared categories are read once); an
        image that cannot be decoded gives its BadImage in its place."""
        if isinstance(images, (str, os.PathLike, bytes)):
            raise CbirError("query_many takes a list of images (query takes one)")
        options = _options(n, all, **kwargs)
        decoded: list[DecodedQuery | BadImage] = []
        for image in images:
            try:
                decoded.append(self._decoded(image, None, options))
            except BadImage as bad:
                decoded.append(bad)
        good = [d for d in decoded if not isinstance(d, BadImage)]
        found = iter(self._search(good, options))
        return [d if isinstance(d, BadImage) else next(found) for d in decoded]

    def _search(self, decoded: list[DecodedQuery], options: QueryOptions) -> list[QueryResult]:
        """The model describes the queries (one at a time: it is not shared between threads),
        then the database is searched (readers of the catalog take turns)."""
        if not decoded:
            return []
        model = self.model()
        with self._model_lock:
            described = describe(model, decoded)
        with self._lock:
            return search_described(self._db, decoded, described, options,
                                    self._matrix_in_memory())  # fmt: skip

    def query_id(
        self, image_id: int, n: int = 10, all: bool = False, **kwargs: Any  # noqa: A002
    ) -> QueryResult:
        """"More like this": the n images most similar to one the database holds (by its
        stored feature: nothing is decoded), itself left out. KeyError if it is not held."""
        options = _options(n, all, **kwargs)
        with self._lock:
            result = search_like(self._db, image_id, options, self._matrix_in_memory())
        if result is None:
            raise KeyError(image_id)
        return result

    def warm_up(self) -> None:
        """Load the model and read the search matrix now, not on the first query."""
        self.model()
        with self._lock, self._db.catalog.snapshot():
            resident = self._matrix_in_memory()
            if resident is not None:
                resident.refresh(self._db)
            else:
                self._db.matrix()

    def _matrix_in_memory(self) -> ResidentMatrix | None:
        """The resident matrix, where asked for and while the matrix fits its budget."""
        if not self._in_memory or not ResidentMatrix.fits(self._db):
            self._resident = None
            return None
        if self._resident is None:
            self._resident = ResidentMatrix(self._db.settings.feature_dim)
        return self._resident

    def _decoded(self, image: ImageInput, name: str | None, options: QueryOptions) -> DecodedQuery:
        size = self.model().backbone.input_size
        resize = self._db.settings.resize
        if isinstance(image, (str, os.PathLike)):
            label = Path(image)
            image = read_source(label)
        else:
            label = Path(name or "<image>")
        if isinstance(image, bytes):
            pixels = load_image(label, size, image, options.max_megapixels, resize)
            return label, pixels, content_id(image)
        if isinstance(image, Image.Image):
            return label, model_input(image.convert("RGB"), size, resize), None
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] != 3
        ):  # fmt: skip
            raise CbirError(f"a query array must be (h, w, 3) or (h, w) uint8, not "
                            f"{array.shape} {array.dtype}")  # fmt: skip
        return label, model_input(Image.fromarray(array).convert("RGB"), size, resize), None

    # -- changing it ------------------------------------------------------------------------

    def add(self, paths: PathsInput, **options: Any) -> IndexReport:
        """Index more files or folders, with the database's own settings."""
        return index_paths(self.db_dir, _paths(paths),
                           IndexOptions(engine=self._engine, precision=self._precision,
                                        weights=self._weights, **options))  # fmt: skip

    def remove(self, paths: PathsInput) -> Removal:
        """Forget these source files (or every file under these folders)."""
        return _remove_sources(self.db_dir, _paths(paths))

    def sync(self) -> Removal:
        """Forget source paths that no longer exist."""
        return _sync(self.db_dir)

    def train(
        self, labelled: str | os.PathLike | None = None, groups: str | os.PathLike | None = None,
        epochs: int | None = None, check: bool = True,
    ) -> TrainReport:
        """Learn a query head from a folder of class sub-folders, or a path,group CSV (what
        `cbir train` does); queries use it from the next call on."""
        from cbir.evaluate import labels_from_csv, labels_from_folders

        if (labelled is None) == (groups is None):
            raise CbirError("give either a labelled folder or groups")
        labels = labels_from_csv(Path(groups)) if groups is not None else \
            labels_from_folders(Path(labelled))  # fmt: skip
        options = TrainOptions(epochs=epochs, weights=self._weights, engine=self._engine,
                               precision=self._precision, check=check)  # fmt: skip
        return _train(self.db_dir, labels, str(groups or labelled), options)

    def reset_training(self) -> bool:
        """Remove the query head (`cbir train --reset`); False if there was none."""
        return _reset_training(self.db_dir)

    # -- looking at it ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What `cbir info --json` prints: settings, counts, disk use, categories."""
        db, s = self._db, self._db.settings
        with self._lock, db.catalog.snapshot():
            counts = {"images": db.n_images(), "paths": db.n_paths()}
            head = db.head_provenance()
            generation, trained = db.catalog.ivf_state()
            inverted = None if generation == 0 else {
                "lists": len(db.ivf()), "trained_on": trained,
                "new_rows": db.catalog.count_in_list(ivf.NEW_ROWS)}  # fmt: skip
            cats = self.categories()
        return {
            "db": str(db.db_dir), "backbone": s.backbone, "weights": s.weights,
            "feature_dim": s.feature_dim, "pooling": s.pooling, "top_k": s.top_k,
            "link": s.link, "engine": s.engine, "precision": s.precision, "resize": s.resize,
            "format_version": FORMAT_VERSION, "created": db.manifest.created,
            "updated": db.manifest.updated, **counts, "disk_bytes": db.disk_bytes(),
            "query_head": head, "inverted_file": inverted,
            "categories": [{"id": c.id, "name": c.name, "images": c.images} for c in cats],
        }  # fmt: skip

    def categories(self) -> list[CategoryInfo]:
        """The database's categories, largest first."""
        names = categories.names_by_wnid()
        with self._lock:
            sizes = self._db.category_sizes()
        ordered = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        return [CategoryInfo(w, names[w], n) for w, n in ordered]

    def category_images(
        self, wnid: str, offset: int = 0, limit: int = 60
    ) -> tuple[int, list[ImageInfo]]:
        """(how many images category `wnid` holds, `limit` of them from `offset`, by id).
        KeyError for a category the database does not have."""
        with self._lock, self._db.catalog.snapshot():
            if wnid not in self._db.category_sizes():
                raise KeyError(wnid)
            members = self._db.members(wnid)
            page = [self._image(int(i)) for i in members[offset : offset + limit]]
        return len(members), [p for p in page if p is not None]

    def image(self, image_id: int) -> ImageInfo | None:
        with self._lock:
            return self._image(image_id)

    def _image(self, image_id: int) -> ImageInfo | None:
        record = self._db.image(image_id)
        if record is None:
            return None
        paths = tuple(self._db.paths_of(image_id))
        first = paths[0] if paths else str(self._db.stored_path(record))
        return ImageInfo(image_id, first, paths, record.wnids, record.probs)

    def image_bytes(self, image_id: int) -> tuple[str, bytes] | None:
        """(file name, content) of an image the catalog lists: its stored copy, read without
        following a link (a symlinked database: its first source file that still exists);
        None if the catalog does not list it or its file is gone. A request's text never
        becomes a path: only the catalog's names do, and a source file is served only with
        the content hash the catalog has for it."""
        with self._lock:
            record = self._db.image(image_id)
            if record is None:
                return None
            sources = self._db.paths_of(image_id)
            stored = self._db.stored_path(record)
        if not os.path.islink(stored.parent):
            data = _read_no_follow(stored)
            if data is not None:
                return record.stored_name, data
        if self._db.settings.link == "symlink":  # the copies are links to the sources
            for source in sources:
                data = _read_no_follow(Path(source))
                if data is not None and hashlib.sha256(data).hexdigest() == record.sha256:
                    return record.stored_name, data  # the very content that was indexed
        return None


def _paths(paths: PathsInput) -> list[Path]:
    """One path or several: a lone string is a path, never a sequence of characters."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _options(
    n: int,
    search_all: bool,
    exact: bool = False,
    min_candidates: int = DEFAULT_MIN_CANDIDATES,
    query_expansion: int = DEFAULT_QUERY_EXPANSION,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    min_score: float = -1.0,
    exclude_self: bool = False,
) -> QueryOptions:
    if n < 1:
        raise CbirError("n must be at least 1")
    return QueryOptions(n_results=n, search_all=search_all, exact=exact,
                        min_candidates=min_candidates, query_expansion=query_expansion,
                        max_megapixels=max_megapixels, min_score=min_score,
                        exclude_self=exclude_self)  # fmt: skip


def _read_no_follow(path: Path) -> bytes | None:
    """A regular file's bytes, or None if it is missing, a link or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read()
    except OSError:
        return None


def result_json(result: QueryResult, shown: Callable[[object], str] = str) -> dict[str, Any]:
    """A query result as one line of `cbir query --json` (paths passed through `shown`)."""
    return {
        "query": shown(result.query_path),
        "categories": [{"id": c.wnid, "name": c.name, "prob": round(c.prob, 6)}
                       for c in result.categories],
        "searched_categories": list(result.gating.wnids),
        "searched_lists": list(result.gating.lists),
        "searched": result.n_searched,
        "search": result.method,
        "results": [hit_json(h, shown) for h in result.hits],
    }  # fmt: skip


def hit_json(hit: Hit, shown: Callable[[object], str] = str) -> dict[str, Any]:
    """A hit as `cbir query --json` and `cbir find --json` print it."""
    return {"path": shown(hit.path), "score": round(hit.score, 6),
            "cosine": round(hit.cosine, 6), "id": hit.id, "categories": list(hit.categories),
            "paths": [shown(p) for p in hit.paths]}  # fmt: skip
