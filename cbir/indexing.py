"""create-db / add / remove / sync: walk -> hash -> decode -> describe -> store, incrementally.

Unchanged files are recognised by (size, mtime) without being read; new or changed files are
hashed, and a file whose content is already indexed only adds its path. Decoding runs on worker
threads (Pillow releases the GIL) while the model runs on the main thread. Work is committed in
chunks, so an interrupted run keeps what it committed and the same command completes it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.errors import BadImage
from cbir.images import DEFAULT_MAX_MEGAPIXELS, find_images, load_image
from cbir.model import Model, get_backbone, load_model, resolve_weights
from cbir.store import NewImage, Settings, Writer, open_writer

DEFAULT_BATCH_SIZE = 8  # fastest or within 5 % of it for every engine and backbone (bench/)
COMMIT_EVERY_IMAGES = 1024
COMMIT_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class IndexOptions:
    backbone: str
    weights: str = "imagenet"
    top_k: int = 4
    link: str = "copy"
    pooling: str = "gap"
    engine: str = "auto"
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    commit_every: int = COMMIT_EVERY_IMAGES  # images per commit (or COMMIT_EVERY_SECONDS)
    wait: bool = True


@dataclass
class IndexReport:
    indexed: int = 0  # new images described and stored
    unchanged: int = 0  # files already indexed, recognised by size and mtime
    new_paths: int = 0  # files whose content was already indexed under another name
    removed: int = 0  # images dropped (changed or deleted sources)
    skipped: list[BadImage] = field(default_factory=list)


_Found = tuple[str, int, int]  # a file to index: path, size, mtime_ns


@dataclass(frozen=True)
class _Prepared:
    """A file read and hashed; `pixels` is None when its content is already known."""

    path: Path
    sha256: str
    size: int
    mtime_ns: int
    pixels: npt.NDArray[np.uint8] | None


@dataclass
class Callbacks:
    on_skip: Callable[[BadImage], None] = lambda bad: None
    on_wait: Callable[[str], None] = lambda message: None
    progress: Callable[[int], Callable[[int], None]] = lambda total: lambda n: None


def index_paths(
    db_dir: Path, sources: list[Path], options: IndexOptions, callbacks: Callbacks | None = None
) -> IndexReport:
    """Index every image under `sources` into the database at `db_dir` (created if needed)."""
    callbacks = callbacks or Callbacks()
    backbone = get_backbone(options.backbone)
    spec = resolve_weights(backbone, options.weights)
    settings = Settings(
        backbone=backbone.name,
        weights=spec.identity,
        feature_dim=backbone.feature_dim,
        top_k=options.top_k,
        pooling=options.pooling,
        link=options.link,
    )
    report = IndexReport()
    db_abs = _absolute(db_dir)
    with open_writer(db_dir, settings, options.wait, callbacks.on_wait) as writer:
        todo: list[_Found] = []  # plain tuples: a run may find millions of files
        for item in find_images([_absolute(s) for s in sources], exclude=db_abs):
            if isinstance(item, BadImage):
                _skip(report, callbacks, item)
                continue
            try:
                stat = item.stat()
            except OSError as exc:
                _skip(report, callbacks, BadImage(item, f"cannot read ({exc.strerror})"))
                continue
            found = (str(item), stat.st_size, stat.st_mtime_ns)
            if writer.lookup_path(*found) is not None:
                report.unchanged += 1
            else:
                todo.append(found)
        if todo:
            _describe_and_store(writer, todo, options, callbacks, report)
    return report


def _skip(report: IndexReport, callbacks: Callbacks, bad: BadImage) -> None:
    report.skipped.append(bad)
    callbacks.on_skip(bad)


class _Committer:
    """Stores described images on a background thread, so that copying images and rewriting
    category files overlap with inference: each batch's copies are placed as soon as it is
    described, and chunks are committed; at most one commit is in flight."""

    def __init__(self, writer: Writer, commit_every: int) -> None:
        self.writer, self.commit_every = writer, commit_every
        self.images: list[NewImage] = []
        self.paths: list[tuple[str, str, int, int]] = []  # (path, sha256, size, mtime_ns)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cbir-commit")
        self._in_flight: deque[Future[None]] = deque()  # in order: copies, then commits
        self._last = time.perf_counter()

    def add(self, images: list[NewImage]) -> None:
        self.images.extend(images)
        self._in_flight.append(self._pool.submit(self.writer.place_copies, images))
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()  # re-raises its error here

    def due(self) -> bool:
        """Every `commit_every` images, and at least once a minute: a slow model loses at
        most a minute of work to a crash."""
        since = time.perf_counter() - self._last
        return len(self.images) >= self.commit_every or since > COMMIT_EVERY_SECONDS

    def commit(self) -> None:
        self.wait()
        images, paths = self.images, self.paths
        self.images, self.paths = [], []
        self._last = time.perf_counter()
        self._in_flight.append(self._pool.submit(self._store, images, paths))

    def _store(self, images: list[NewImage], paths: list[tuple[str, str, int, int]]) -> None:
        self.writer.add_images(images)
        self.writer.add_paths(paths)

    def wait(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().result()  # re-raises its error here

    def close(self) -> None:
        """Let a commit in flight finish (also on errors and Ctrl-C), then stop the thread."""
        self._pool.shutdown(wait=True)


def _describe_and_store(
    writer: Writer,
    todo: list[_Found],
    options: IndexOptions,
    callbacks: Callbacks,
    report: IndexReport,
) -> None:
    model: Model | None = None
    size = get_backbone(options.backbone).input_size
    advance = callbacks.progress(len(todo))
    # Contents described but not committed yet (a committed one is in the catalog): the chunk
    # being collected and the one being committed, so the sets stay small in a long run.
    collecting: set[str] = set()
    committing: set[str] = set()
    n_before = writer.n_images()
    committer = _Committer(writer, options.commit_every)

    def prepare(found: _Found) -> _Prepared:
        path, file_size, mtime_ns = Path(found[0]), found[1], found[2]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadImage(path, f"cannot read ({exc.strerror})") from exc
        sha = hashlib.sha256(data).hexdigest()
        if writer.has_image(sha):
            return _Prepared(path, sha, file_size, mtime_ns, None)
        pixels = load_image(path, size, data, options.max_megapixels, writer.settings.resize)
        return _Prepared(path, sha, file_size, mtime_ns, pixels)

    def describe(batch: list[_Prepared]) -> None:
        nonlocal model
        if model is None:
            model = _load(options)
            writer.record_engine(model.engine, model.precision)
        committer.add(_describe(model, batch, options.top_k, options.pooling))
        report.indexed += len(batch)
        advance(len(batch))

    batch: list[_Prepared] = []
    try:
        for result in _prefetch(prepare, todo, window=2 * options.batch_size + 8):
            if isinstance(result, BadImage):
                _skip(report, callbacks, result)
                advance(1)
                continue
            sha = result.sha256
            known = result.pixels is None or sha in collecting or sha in committing
            if known or writer.has_image(sha):  # committed since `prepare` looked
                entry = (str(result.path), result.sha256, result.size, result.mtime_ns)
                committer.paths.append(entry)
                report.new_paths += 1
                advance(1)
                continue
            collecting.add(sha)
            batch.append(result)
            if len(batch) == options.batch_size:
                describe(batch)
                batch = []
                if committer.due():
                    committer.commit()  # waits for the commit before: `committing` is in
                    committing, collecting = collecting, set()
        if batch:
            describe(batch)
        committer.commit()
        committer.wait()
    finally:
        committer.close()
    report.removed = n_before + report.indexed - writer.n_images()


def _load(options: IndexOptions) -> Model:
    return load_model(options.backbone, options.weights, options.engine, options.precision)


def _describe(model: Model, batch: list[_Prepared], top_k: int, pooling: str) -> list[NewImage]:
    pixels = np.stack([p.pixels for p in batch if p.pixels is not None])
    described = model.describe(pixels)
    wnids = categories.wnids()
    top = np.argsort(-described.probs, axis=1)[:, :top_k]
    return [
        NewImage(
            source_path=p.path,
            sha256=p.sha256,
            size=p.size,
            mtime_ns=p.mtime_ns,
            wnids=tuple(wnids[j] for j in top[i]),
            probs=tuple(float(described.probs[i, j]) for j in top[i]),
            feature=described.features[pooling][i].copy(),  # not a view: frees the batch
        )
        for i, p in enumerate(batch)
    ]


def _prefetch(
    prepare: Callable[[_Found], _Prepared],
    todo: Iterable[_Found],
    window: int,
) -> Iterator[_Prepared | BadImage]:
    """Run `prepare` on worker threads, at most `window` ahead, yielding results in order."""
    workers = max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(workers, thread_name_prefix="cbir-decode") as pool:
        queue: deque[Future[_Prepared]] = deque()
        for found in todo:
            queue.append(pool.submit(prepare, found))
            if len(queue) >= window:
                yield _result(queue.popleft())
        while queue:
            yield _result(queue.popleft())


def _result(future: Future[_Prepared]) -> _Prepared | BadImage:
    try:
        return future.result()
    except BadImage as bad:
        return bad


def remove_sources(
    db_dir: Path, paths: list[Path], wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> int:
    """Forget these files (or every file under these folders). Returns images removed."""
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        targets = [str(_absolute(p)) for p in paths]
        doomed = [
            known
            for known in writer.catalog.paths
            if any(known == t or known.startswith(t.rstrip("/") + "/") for t in targets)
        ]
        return writer.remove_paths(doomed)


def sync(db_dir: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> int:
    """Forget source paths that no longer exist. Returns images removed."""
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        gone = [p for p in writer.catalog.paths if not os.path.exists(p)]
        return writer.remove_paths(gone) if gone else 0


def _absolute(path: Path) -> Path:
    """Absolute and normalised ('a/../b' -> 'b'), without resolving symbolic links."""
    return Path(os.path.abspath(path))
