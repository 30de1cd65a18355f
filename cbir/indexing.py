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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.db import MANIFEST_NAME, NewImage, Settings, Writer, open_writer, read_manifest
from cbir.db.catalog import TOP_CLASSES
from cbir.errors import BadImage, CbirError, DatabaseError
from cbir.images import (
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_RESIZE,
    find_images,
    load_image,
    read_source,
)
from cbir.model import Model, get_backbone, load_model, resolve_weights

if TYPE_CHECKING:
    from cbir.cluster import ClusterReport

DEFAULT_BATCH_SIZE = 8  # fastest or within 5 % of it for every engine and backbone (bench/)
COMMIT_EVERY_IMAGES = 1024
COMMIT_EVERY_SECONDS = 60.0
RECORD_EVERY_COMMITS = 16  # commits between writes of the category files (cbir.db.writer)


@dataclass(frozen=True)
class IndexOptions:
    """What to index with. None: the existing database's own setting, else the default."""

    backbone: str | None = None
    weights: str | None = None
    top_k: int | None = None
    link: str | None = None
    pooling: str | None = None
    engine: str = "auto"
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    commit_every: int = COMMIT_EVERY_IMAGES  # images per commit (or COMMIT_EVERY_SECONDS)
    wait: bool = True
    ray: str | None = None  # describe on Ray: "local", "auto" or "HOST:PORT" (cbir.cluster)
    ray_ship_bytes: bool = False  # the writer sends files' bytes (no shared file system)


@dataclass
class IndexReport:
    indexed: int = 0  # new images described and stored
    unchanged: int = 0  # files already indexed, recognised by size and mtime
    new_paths: int = 0  # files whose content was already indexed under another name
    removed: int = 0  # images dropped (changed or deleted sources)
    skipped: list[BadImage] = field(default_factory=list)
    cluster: ClusterReport | None = None  # where a --ray run described (cbir.cluster)


_Found = tuple[str, int, int]  # a file to index: path, size, mtime_ns


@dataclass(frozen=True)
class _Prepared:
    """A file read and hashed; `pixels` is None when its content is already known."""

    path: Path
    sha256: str
    size: int
    mtime_ns: int
    pixels: npt.NDArray[np.uint8] | None
    warnings: tuple[str, ...] = ()  # damage the decoder worked around (corrupt EXIF data)


@dataclass
class Callbacks:
    on_skip: Callable[[BadImage], None] = lambda bad: None
    on_wait: Callable[[str], None] = lambda message: None
    progress: Callable[[int], Callable[[int], None]] = lambda total: lambda n: None
    on_commit: Callable[[int], None] = lambda images: None  # images committed so far in the run
    on_warning: Callable[[Path, str], None] = lambda path, message: None


DEFAULTS = {"top_k": 4, "pooling": "gap", "link": "copy"}
BUILD_SETTINGS = ("top_k", "pooling", "link")  # fixed once a database holds an image


def resolve_options(db_dir: Path, options: IndexOptions) -> IndexOptions:
    """Every setting filled in: what the caller gave, else the database's own, else the
    default. A weights file is never guessed (it is recorded by its hash only)."""
    from cbir.model import DEFAULT_BACKBONE

    built = read_manifest(db_dir).settings if (db_dir / MANIFEST_NAME).exists() else None
    chosen = {name: getattr(options, name) if getattr(options, name) is not None else
              getattr(built, name) if built is not None else DEFAULTS[name]
              for name in BUILD_SETTINGS}  # fmt: skip
    weights = options.weights
    if weights is None:
        weights = built.weights if built is not None else "imagenet"
        if weights.startswith("sha256:"):
            raise CbirError(f"{db_dir} was built with a weights file; pass it with --weights FILE")
    if not 1 <= chosen["top_k"] <= 1000:
        raise CbirError("--top-k must be between 1 and 1000")
    backbone = options.backbone or (built.backbone if built is not None else DEFAULT_BACKBONE)
    return replace(options, backbone=backbone, weights=weights, **chosen)


def _refuse_other_settings(writer: Writer, options: IndexOptions, identity: str) -> None:
    """A database keeps the settings it was built with (the library refuses, not only the CLI)."""
    s = writer.settings
    for name in BUILD_SETTINGS:
        if getattr(options, name) != getattr(s, name):
            raise DatabaseError(
                f"{writer.db_dir} was built with --{name.replace('_', '-')} {getattr(s, name)}; "
                "a database keeps one setting (build a new one to change it)"
            )
    if (options.backbone, identity) != (s.backbone, s.weights):
        from cbir.db import check_compatible

        check_compatible(writer.db_dir, s, str(options.backbone), identity)


def index_paths(
    db_dir: Path, sources: list[Path], options: IndexOptions, callbacks: Callbacks | None = None
) -> IndexReport:
    """Index every image under `sources` into the database at `db_dir` (created if needed).
    Settings not given are the database's own; given ones must match a database that holds
    images (an empty one takes them)."""
    callbacks = callbacks or Callbacks()
    options = resolve_options(db_dir, options)
    backbone = get_backbone(str(options.backbone))
    spec = resolve_weights(backbone, str(options.weights))
    built = read_manifest(db_dir).settings if (db_dir / MANIFEST_NAME).exists() else None
    settings = Settings(
        backbone=backbone.name,
        weights=spec.identity,
        feature_dim=backbone.feature_dim,
        top_k=int(options.top_k or 4),
        pooling=str(options.pooling),
        link=str(options.link),
        resize=built.resize if built is not None else DEFAULT_RESIZE,
    )
    report = IndexReport()
    db_abs = _absolute(db_dir)
    with open_writer(db_dir, settings, options.wait, callbacks.on_wait) as writer:
        _refuse_other_settings(writer, options, spec.identity)
        writer.record_every = RECORD_EVERY_COMMITS * options.commit_every
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

    def __init__(self, writer: Writer, commit_every: int, on_commit: Callable[[int], None]) -> None:
        self.writer, self.commit_every, self.on_commit = writer, commit_every, on_commit
        self.committed = 0
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
        self.committed += len(images) + len(paths)
        self.on_commit(self.committed)

    def wait(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().result()  # re-raises its error here

    def close(self) -> None:
        """Let a commit in flight finish (also on errors and Ctrl-C), then stop the thread."""
        self._pool.shutdown(wait=True)


class _Run:
    """What the local and the cluster pipelines share: skips, known content, commits."""

    def __init__(
        self, writer: Writer, todo: list[_Found], options: IndexOptions, callbacks: Callbacks,
        report: IndexReport,
    ) -> None:  # fmt: skip
        self.writer, self.callbacks, self.report = writer, callbacks, report
        self.advance = callbacks.progress(len(todo))
        self.committer = _Committer(writer, options.commit_every, callbacks.on_commit)
        # Contents described but not committed yet (a committed one is in the catalog): the
        # chunk being collected and the one being committed, so the sets stay small.
        self.collecting: set[str] = set()
        self.committing: set[str] = set()
        self.n_before = writer.n_images()

    def skip(self, bad: BadImage) -> None:
        _skip(self.report, self.callbacks, bad)
        self.advance(1)

    def known(self, sha256: str) -> bool:
        """Whether this content is indexed or on its way (then only its path is added)."""
        return sha256 in self.collecting or sha256 in self.committing or (
            self.writer.has_image(sha256))  # fmt: skip

    def add_path(self, path: Path, sha256: str, size: int, mtime_ns: int) -> None:
        self.committer.paths.append((str(path), sha256, size, mtime_ns))
        self.report.new_paths += 1
        self.advance(1)

    def store(self, images: list[NewImage]) -> None:
        """Described new images (their content marked as collected by the caller)."""
        self.committer.add(images)
        self.report.indexed += len(images)
        self.advance(len(images))
        if self.committer.due():
            self.committer.commit()  # waits for the commit before: `committing` is in
            self.committing, self.collecting = self.collecting, set()

    def finish(self) -> None:
        self.committer.commit()
        self.committer.wait()

    def close(self) -> None:
        self.committer.close()
        self.report.removed = self.n_before + self.report.indexed - self.writer.n_images()


def _describe_and_store(
    writer: Writer,
    todo: list[_Found],
    options: IndexOptions,
    callbacks: Callbacks,
    report: IndexReport,
) -> None:
    if options.ray is not None:
        return _describe_on_cluster(writer, todo, options, callbacks, report)
    model: Model | None = None
    size = get_backbone(options.backbone).input_size
    run = _Run(writer, todo, options, callbacks, report)

    def prepare(found: _Found) -> _Prepared:
        path, file_size, mtime_ns = Path(found[0]), found[1], found[2]
        data = read_source(path)
        sha = hashlib.sha256(data).hexdigest()
        if writer.has_image(sha):
            return _Prepared(path, sha, file_size, mtime_ns, None)
        warned: list[str] = []
        pixels = load_image(path, size, data, options.max_megapixels, writer.settings.resize,
                            warned)  # fmt: skip
        return _Prepared(path, sha, file_size, mtime_ns, pixels, tuple(dict.fromkeys(warned)))

    def describe(batch: list[_Prepared]) -> None:
        nonlocal model
        if model is None:
            model = _load(options)
            writer.record_engine(model.engine, model.precision)
        run.store(_describe(model, batch, writer.settings.top_k, writer.settings.pooling))

    batch: list[_Prepared] = []
    try:
        for result in _prefetch(prepare, todo, window=2 * options.batch_size + 8):
            if isinstance(result, BadImage):
                run.skip(result)
                continue
            if result.warnings:
                callbacks.on_warning(result.path, "; ".join(result.warnings))
            if result.pixels is None or run.known(result.sha256):
                run.add_path(result.path, result.sha256, result.size, result.mtime_ns)
                continue
            run.collecting.add(result.sha256)
            batch.append(result)
            if len(batch) == options.batch_size:
                describe(batch)
                batch = []
        if batch:
            describe(batch)
        run.finish()
    finally:
        run.close()


def _describe_on_cluster(
    writer: Writer,
    todo: list[_Found],
    options: IndexOptions,
    callbacks: Callbacks,
    report: IndexReport,
) -> None:
    """The Ray pipeline (cbir.cluster): actors hash, decode and describe every file; this
    process stores their results in order, exactly as the local pipeline does. Content that
    is already indexed is described too (only the actor has read the file)."""
    from cbir import cluster

    spec = cluster.ModelSpec(str(options.backbone), str(options.weights), options.engine,
                             options.precision, get_backbone(options.backbone).input_size,
                             writer.settings.resize, options.max_megapixels,
                             options.batch_size)  # fmt: skip
    found = {path: (size, mtime_ns) for path, size, mtime_ns in todo}
    settings = writer.settings
    with cluster.connected(str(options.ray)) as ray:
        workers = cluster.Cluster(ray, spec, settings.pooling)
        report.cluster = workers.report
        writer.record_engine(*workers.report.engine)
        run = _Run(writer, todo, options, callbacks, report)
        ready: list[NewImage] = []
        try:
            files = cluster.batches(list(found), options.ray_ship_bytes)
            for d in workers.describe(files):
                path, (size, mtime_ns) = Path(d.path), found[d.path]
                if d.reason is not None:
                    run.skip(BadImage(path, d.reason))
                    continue
                if d.warnings:
                    callbacks.on_warning(path, "; ".join(d.warnings))
                if run.known(d.sha256):
                    run.add_path(path, d.sha256, size, mtime_ns)
                    continue
                run.collecting.add(d.sha256)
                ready.append(_new_image(path, d.sha256, size, mtime_ns, d.probs, d.feature,
                                        settings.top_k))  # fmt: skip
                if len(ready) == options.batch_size:
                    run.store(ready)
                    ready = []
            if ready:
                run.store(ready)
            run.finish()
        finally:
            run.close()
            workers.close()


def _load(options: IndexOptions) -> Model:
    return load_model(str(options.backbone), str(options.weights), options.engine,
                      options.precision)  # fmt: skip


def _describe(model: Model, batch: list[_Prepared], top_k: int, pooling: str) -> list[NewImage]:
    pixels = np.stack([p.pixels for p in batch if p.pixels is not None])
    described = model.describe(pixels)
    return [_new_image(p.path, p.sha256, p.size, p.mtime_ns, described.probs[i],
                       described.features[pooling][i].copy(), top_k)  # a copy frees the batch
            for i, p in enumerate(batch)]  # fmt: skip


def _new_image(
    path: Path, sha256: str, size: int, mtime_ns: int, probs: npt.NDArray[np.float32],
    feature: npt.NDArray[np.float32], top_k: int,
) -> NewImage:  # fmt: skip
    """A described image as the writer stores it: probs (1000,), feature (d,)."""
    wnids = categories.wnids()
    order = np.argsort(-probs)
    return NewImage(
        source_path=path, sha256=sha256, size=size, mtime_ns=mtime_ns,
        wnids=tuple(wnids[j] for j in order[:top_k]),
        probs=tuple(float(probs[j]) for j in order[:top_k]),
        feature=feature,
        top_classes=tuple(int(j) for j in order[:TOP_CLASSES]),
        top_probs=tuple(float(probs[j]) for j in order[:TOP_CLASSES]),
    )  # fmt: skip


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


@dataclass(frozen=True)
class Removal:
    images: int  # images removed (no path points at their content any more)
    paths: int  # source paths forgotten
    not_indexed: list[Path]  # targets that matched no indexed path
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not checkable:
    # kept, since only a file known to be gone is forgotten


def remove_sources(
    db_dir: Path, paths: list[Path], wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Removal:
    """Forget these files (or every file under these folders)."""
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        targets = {t: str(_absolute(t)) for t in paths}
        matched: set[Path] = set()
        doomed = []
        for known, _ in writer.catalog.paths():
            for target, text in targets.items():
                if known == text or known.startswith(text.rstrip("/") + "/"):
                    matched.add(target)
                    doomed.append(known)
                    break
        removed = writer.remove_paths(doomed) if doomed else 0
        return Removal(removed, len(doomed), [t for t in paths if t not in matched])


def sync(db_dir: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Removal:
    """Forget source paths known to be gone; a path that cannot be looked at (a folder without
    permission, an I/O error) is reported in Removal.unknown and kept."""
    with open_writer(db_dir, wait=wait, on_wait=on_wait) as writer:
        gone, unknown = [], []
        for path, _ in writer.catalog.paths():
            state = source_state(path)
            if state == "gone":
                gone.append(path)
            elif state != "present":
                unknown.append((path, state))
        return Removal(writer.remove_paths(gone) if gone else 0, len(gone), [], unknown)


def source_state(path: str) -> str:
    """"present", "gone" (it, and each missing folder above it, answers 'no such file', up to
    a folder that exists), or why it cannot be told (e.g. "Permission denied"): a source on
    an unreadable folder or a share that answers with an error is not taken for deleted."""
    current = os.path.abspath(path)
    while True:
        try:
            os.lstat(current)
            return "present" if current == os.path.abspath(path) else "gone"
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(current)
            if parent == current:
                return "gone"
            current = parent
        except OSError as exc:
            return exc.strerror or type(exc).__name__


def _absolute(path: Path) -> Path:
    """Absolute and normalised ('a/../b' -> 'b'), without resolving symbolic links."""
    return Path(os.path.abspath(path))
