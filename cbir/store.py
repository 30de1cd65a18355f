"""The database on disk; the only module that writes it.

Layout (rows are images; every .npz holds plain numpy arrays and loads with allow_pickle=False):

    DB_DIR/cbir-db.json                 manifest: format version, model, settings, counts
    DB_DIR/catalog.sqlite               every indexed image, its categories and every source
                                        path known for it (cbir.catalogdb)
    DB_DIR/<wnid>_<name>/features.<lo>-<hi>.npz   a segment of the category's rows (see
                                        Segment): ids (r,) int64, paths (r,) str, files (r,)
                                        str, features (r, d) float32 unit-norm rows
    DB_DIR/<wnid>_<name>/<stem>-<hash><ext>   the stored copies (or links) of the images
    DB_DIR/.lock, DB_DIR/.writing       writer lock; marker of a write in progress

An image's id is the first 8 bytes of the SHA-256 of its file, so the same photo under two names
is stored and computed once. The catalog is the commit point: an image is indexed exactly when
the catalog lists it. Files are written to a temporary name in their folder, fsynced, then
renamed over the old one; the catalog changes in one SQLite transaction per commit. Order:
  add:    copy images into category folders -> sync -> new category segments -> catalog ->
          manifest -> merge segments
  remove: catalog -> category segments -> delete stored copies -> manifest
Readers keep only category rows that the catalog lists in that category, so a crash at any
point leaves a database that answers queries; the next writer sees the `.writing` marker and
repairs it (drops uncommitted rows, stale segments and orphan copies) before it goes on.
Formats 1 and 2 kept the catalog in catalog.npz, rewritten whole at every commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import IO, TypeVar

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.catalog import Catalog, ImageRecord, ImageTable, PathRecord, PathTable
from cbir.catalogdb import CatalogDB, CatalogError, NewRecord
from cbir.errors import CbirError, DatabaseError, DatabaseLocked
from cbir.hashing import file_sha256, image_id_of

FORMAT_VERSION = 3  # 2: category rows in segments; 3: the catalog in SQLite
MANIFEST_NAME = "cbir-db.json"
CATALOG_NAME = "catalog.sqlite"
LEGACY_CATALOG_NAME = "catalog.npz"  # the catalog in formats 1 and 2: rewritten per commit
FEATURES_NAME = "features.npz"  # a category's rows in format 1: one file, rewritten per commit
READ_ATTEMPTS = 20  # listings of a category folder a reader tries while a writer merges
SEGMENT_NAME = re.compile(r"features\.(\d+)-(\d+)\.npz")  # format 2: segments, see Segment
LOCK_NAME = ".lock"
WRITING_NAME = ".writing"
LINK_MODES = ("copy", "hardlink", "symlink")


@dataclass(frozen=True)
class Settings:
    """How a database was built; queries must use the same backbone and weights."""

    backbone: str
    weights: str  # "imagenet", "none" or "sha256:<hex>"
    feature_dim: int
    top_k: int = 4
    pooling: str = "gap"
    link: str = "copy"
    engine: str = ""
    precision: str = ""
    resize: str = "bilinear"  # the filter of cbir.images.load_image features were computed with


# Settings added to format 1 later, with the value every database written before them had.
_SETTINGS_BEFORE_RECORDED = {"resize": "bicubic"}


@dataclass
class Manifest:
    settings: Settings
    created: str
    updated: str
    n_images: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {"format": "cbir-db", "format_version": self.format_version}
        data.update(self.settings.__dict__)
        data.update(created=self.created, updated=self.updated, n_images=self.n_images)
        return json.dumps(data, indent=2) + "\n"


@dataclass(frozen=True)
class NewImage:
    """One described image, ready to be stored."""

    source_path: Path
    sha256: str  # hex digest of the file's bytes
    size: int
    mtime_ns: int
    wnids: tuple[str, ...]  # top-k categories, most probable first
    probs: tuple[float, ...]  # their probabilities
    feature: npt.NDArray[np.float32]  # (d,) unit-norm

    @property
    def image_id(self) -> int:
        return image_id_of(self.sha256)


@dataclass(frozen=True)
class CategoryRows:
    """The rows of one category file. ids (r,) int64; paths, files (r,) str; features (r, d)."""

    ids: npt.NDArray[np.int64]
    paths: npt.NDArray[np.str_]
    files: npt.NDArray[np.str_]
    features: npt.NDArray[np.float32]

    @classmethod
    def empty(cls, dim: int) -> CategoryRows:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, "U1"),
            np.zeros(0, "U1"),
            np.zeros((0, dim), np.float32),
        )

    def select(self, mask: npt.NDArray[np.bool_]) -> CategoryRows:
        return CategoryRows(self.ids[mask], self.paths[mask], self.files[mask], self.features[mask])

    def __len__(self) -> int:
        return len(self.ids)

    def unique(self) -> CategoryRows:
        """Each id once (its first row)."""
        _, first = np.unique(self.ids, return_index=True)
        if len(first) == len(self):
            return self
        keep = np.zeros(len(self), bool)
        keep[first] = True
        return self.select(keep)

    @classmethod
    def concatenate(cls, parts: list[CategoryRows], dim: int) -> CategoryRows:
        parts = [p for p in parts if len(p)]
        if len(parts) < 2:
            return parts[0] if parts else cls.empty(dim)
        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.paths for p in parts]),
            np.concatenate([p.files for p in parts]),
            np.concatenate([p.features for p in parts]),
        )


@dataclass(frozen=True)
class Segment:
    """One file of a category's rows, `features.<lo>-<hi>.npz`.

    Each commit adds a segment to every category it touches, numbered one past the folder's
    highest, instead of rewriting the category: a commit costs its own rows, not the
    database's. Segments are merged so that each is more than twice the size of all newer
    ones together (a few files per folder; a row is rewritten O(log n) times). A merge of
    segments lo..hi is named after that whole range: a segment whose range lies inside
    another's is stale (a crash came between a merge and the deletion of what it merged), is
    never read, and is deleted by the next writer. A format-1 `features.npz` is segment 0-0.
    """

    path: Path
    lo: int
    hi: int


def category_segments(folder: Path) -> tuple[list[Segment], list[Segment]]:
    """(live segments, oldest first; stale ones) of a category folder."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return [], []
    found = []
    for name in names:
        if name == FEATURES_NAME:
            found.append(Segment(folder / name, 0, 0))
        elif match := SEGMENT_NAME.fullmatch(name):
            found.append(Segment(folder / name, int(match[1]), int(match[2])))
    live, stale = [], []
    for seg in found:
        inside = any(o is not seg and o.lo <= seg.lo and seg.hi <= o.hi for o in found)
        (stale if inside else live).append(seg)
    return sorted(live, key=lambda seg: seg.lo), stale


def next_segment_number(live: list[Segment], stale: list[Segment]) -> int:
    """One past the highest commit number of a folder's segments, stale ones included."""
    return max((seg.hi for seg in live + stale), default=0) + 1


def read_category_folder(folder: Path, dim: int) -> CategoryRows:
    """All rows of a category's live segments, committed or not, oldest first.
    Raises FileNotFoundError when it has none, DatabaseError when one is damaged.

    A writer may merge or drop a segment between listing the folder and reading it (readers
    take no lock): the folder is then listed again."""
    for _ in range(READ_ATTEMPTS):
        live, _ = category_segments(folder)
        if not live:
            raise FileNotFoundError(folder / FEATURES_NAME)
        try:
            return CategoryRows.concatenate([read_category_file(s.path, dim) for s in live], dim)
        except FileNotFoundError:
            continue
    raise DatabaseError(f"{folder} changed under every one of {READ_ATTEMPTS} reads; try again")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load_npz(
    path: Path, names: Iterable[str], as_kept: dict[str, str | type] | None = None
) -> dict[str, np.ndarray]:
    """Plain arrays from a .npz, with a clear error naming the file when it is damaged.
    `as_kept`: the dtype to keep an array in, converted as soon as it is read (so that no
    two fixed-width str arrays of the file are in memory at once)."""
    as_kept = as_kept or {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {
                name: npz[name].astype(as_kept[name]) if name in as_kept else npz[name]
                for name in names
            }
    except FileNotFoundError:
        raise
    except _DAMAGE as exc:
        raise _damaged(path, exc) from exc


# What reading a truncated or corrupted .npz raises.
_DAMAGE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def _damaged(path: Path, exc: BaseException) -> DatabaseError:
    if isinstance(exc, DatabaseError):
        return exc
    return DatabaseError(
        f"{path} is damaged ({type(exc).__name__}: {exc}); run 'cbir check --repair'"
    )


Writing = Callable[[io.BufferedWriter], None]
T = TypeVar("T")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _write_atomic(path: Path, write: Writing) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp_path = _tmp_name(path)
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
    _fsync_dir(path.parent)


def _write_many_atomic(files: Iterable[tuple[Path, Writing]]) -> None:
    """`_write_atomic` for many files with two syncs in all instead of two fsyncs per file:
    every temporary file is written, synced to disk, renamed, and the renames synced.
    `files` is consumed lazily, so only one file's content needs to be in memory at a time."""
    tmp_paths: dict[Path, Path] = {}
    try:
        for path, write in files:
            tmp_paths[path] = _tmp_name(path)
            with open(tmp_paths[path], "wb") as f:
                write(f)
        os.sync()
        for path, tmp_path in tmp_paths.items():
            os.replace(tmp_path, path)
        os.sync()
    finally:
        for tmp_path in tmp_paths.values():
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _npz_writer(**arrays: np.ndarray | Callable[[], np.ndarray]) -> Writing:
    """Writes a compressed .npz as numpy.savez_compressed does, but at zlib level 1: float
    features barely compress, and level 1 is about 3x faster than the default level 6 for a
    file within a few percent of the same size. An array may be given as the function that
    makes it, called when its turn comes: converted copies then exist one at a time."""

    def write(f: io.BufferedWriter) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as npz:
            for name, array in arrays.items():
                _write_member(npz, name, np.asanyarray(array() if callable(array) else array))

    return write


def _write_member(npz: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with npz.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)


def _save_npz(path: Path, **arrays: np.ndarray | Callable[[], np.ndarray]) -> None:
    _write_atomic(path, _npz_writer(**arrays))


class CategoryMembers(Mapping[str, npt.NDArray[np.int64]]):
    """wnid -> (m,) sorted ids of the committed images stored in that category. Members are
    read from the catalog when first asked for: a query needs a few categories, not all."""

    def __init__(self, db: Database) -> None:
        self._db, self._sizes = db, db.category_sizes()
        self._members: dict[str, npt.NDArray[np.int64]] = {}

    def __getitem__(self, wnid: str) -> npt.NDArray[np.int64]:
        if wnid not in self._sizes:
            raise KeyError(wnid)
        if wnid not in self._members:
            self._members[wnid] = self._db.members(wnid)
        return self._members[wnid]

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._sizes

    def __iter__(self) -> Iterator[str]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)


class Database:
    """Read access to a database: manifest, catalog and category files."""

    def __init__(self, db_dir: Path, manifest: Manifest) -> None:
        self.db_dir = db_dir
        self.manifest = manifest
        self._catalog_file: CatalogDB | None = None
        self._snapshot: Catalog | None = None

    @property
    def settings(self) -> Settings:
        return self.manifest.settings

    @classmethod
    def open(cls, db_dir: Path) -> Database:
        return cls(db_dir, read_manifest(db_dir))

    def _catalog_db(self) -> CatalogDB:
        """The catalog, opened on first use. A database of format 1 or 2 (catalog.npz) is
        read into memory; a writer converts it on disk instead (`Writer._catalog_db`)."""
        if self._catalog_file is None:
            path = self.db_dir / CATALOG_NAME
            if path.exists():
                self._catalog_file = _open_catalog(path)
            else:
                self._catalog_file = CatalogDB.in_memory(self._legacy_catalog())
        return self._catalog_file

    def close(self) -> None:
        """Close the catalog file (a writer's, at the end of `open_writer`)."""
        if self._catalog_file is not None:
            self._catalog_file.close()
            self._catalog_file = None

    def _legacy_catalog(self) -> Catalog:
        return read_legacy_catalog(self.db_dir, self.settings.top_k)

    @property
    def catalog(self) -> Catalog:
        """The whole catalog in memory (read once): for tools that go through every image."""
        if self._snapshot is None:
            self._snapshot = _catalog_call(self.db_dir, self._catalog_db().snapshot,
                                           self.settings.top_k)  # fmt: skip
        return self._snapshot

    def category_dir(self, wnid: str) -> Path:
        return self.db_dir / categories.folder_name(wnid)

    def n_images(self) -> int:
        return _catalog_call(self.db_dir, self._catalog_db().n_images)

    def n_paths(self) -> int:
        """How many source paths point at the database's images (>= the number of images)."""
        return _catalog_call(self.db_dir, self._catalog_db().n_paths)

    def category_sizes(self) -> dict[str, int]:
        """wnid -> number of committed images in it, from the catalog (no category file read)."""
        return _catalog_call(self.db_dir, self._catalog_db().category_sizes)

    def members(self, wnid: str) -> npt.NDArray[np.int64]:
        """(m,) sorted ids of the committed images stored in category `wnid`."""
        return _catalog_call(self.db_dir, self._catalog_db().members, wnid)

    def category_members(self) -> CategoryMembers:
        """wnid -> its members, for every category with images (see CategoryMembers)."""
        return CategoryMembers(self)

    def wnids_of(self, image_id: int) -> tuple[str, ...]:
        """An image's categories, most probable first."""
        return _catalog_call(self.db_dir, self._catalog_db().wnids_of, image_id)

    def read_category(
        self, wnid: str, committed: npt.NDArray[np.int64] | None = None
    ) -> CategoryRows:
        """Committed rows of one category (rows the catalog does not list are left out);
        `committed`: the category's members, when the caller has read them already."""
        folder = self.category_dir(wnid)
        if committed is None:
            committed = self.members(wnid)
        try:
            rows = read_category_folder(folder, self.settings.feature_dim)
        except FileNotFoundError:
            if len(committed):
                raise DatabaseError(
                    f"{folder} has no features file but the catalog lists images in it; "
                    "run 'cbir check --repair'"
                ) from None
            return CategoryRows.empty(self.settings.feature_dim)
        return rows.select(np.isin(rows.ids, committed)).unique()

    def read_categories(
        self, wnids: Iterable[str], members: Mapping[str, npt.NDArray[np.int64]] | None = None
    ) -> CategoryRows:
        """Committed rows of several categories, each image once (an image is in up to k);
        `members`: the categories' members, when the caller has read them already."""
        parts = [self.read_category(w, members[w] if members else None) for w in wnids]
        return CategoryRows.concatenate(parts, self.settings.feature_dim).unique()

    def disk_bytes(self) -> int:
        """Bytes the database takes on disk; hard-linked copies are counted once."""
        sizes: dict[tuple[int, int], int] = {}
        for p in self.db_dir.rglob("*"):
            info = p.lstat()
            if S_ISREG(info.st_mode):
                sizes[info.st_dev, info.st_ino] = info.st_size
        return sum(sizes.values())


def read_manifest(db_dir: Path) -> Manifest:
    path = db_dir / MANIFEST_NAME
    if not db_dir.is_dir():
        raise DatabaseError(f"no database at {db_dir} (create one with 'cbir create-db')")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatabaseError(
            f"{db_dir} is not a cbir database ({MANIFEST_NAME} is missing)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DatabaseError(f"{path} is damaged ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != "cbir-db":
        raise DatabaseError(f"{path} is not a cbir database manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatabaseError(
            f"{path} has format version {version}, newer than this cbir understands "
            f"({FORMAT_VERSION}); upgrade cbir"
        )
    try:
        known = {**_SETTINGS_BEFORE_RECORDED, **data}
        settings = Settings(**{k: known[k] for k in Settings.__dataclass_fields__})
        return Manifest(settings, data["created"], data["updated"], data["n_images"], version)
    except (KeyError, TypeError) as exc:
        raise DatabaseError(f"{path} is damaged (missing field {exc})") from exc


def _write_manifest(db_dir: Path, manifest: Manifest) -> None:
    _write_atomic(db_dir / MANIFEST_NAME, lambda f: f.write(manifest.to_json().encode()))


def read_legacy_catalog(db_dir: Path, top_k: int) -> Catalog:
    """The catalog.npz of a database of format 1 or 2 (empty when there is none)."""
    path = db_dir / LEGACY_CATALOG_NAME
    if not path.exists():
        return Catalog.empty(top_k)
    names = ("ids", "sha256", "stored_names", "wnids", "probs",
             "path_strings", "path_ids", "path_sizes", "path_mtimes")  # fmt: skip
    compact = {"sha256": "S64", "stored_names": object, "wnids": "U9", "probs": np.float32,
               "path_strings": object}  # fmt: skip
    a = _load_npz(path, names, compact)
    n, m = len(a["ids"]), len(a["path_strings"])
    if (
        any(len(a[name]) != n for name in names[:5])
        or any(len(a[name]) != m for name in names[5:])
        or a["wnids"].ndim != 2
        or a["probs"].shape != a["wnids"].shape
    ):
        raise _damaged(path, ValueError("its arrays disagree in length"))
    images = ImageTable(a["ids"], a["sha256"], a["stored_names"], a["wnids"], a["probs"])
    paths = PathTable(a["path_strings"], a["path_ids"], a["path_sizes"], a["path_mtimes"])
    return Catalog(images, paths)


def read_category_file(path: Path, dim: int) -> CategoryRows:
    """All rows of a category file, committed or not. Raises FileNotFoundError, DatabaseError."""
    a = _load_npz(path, ("ids", "paths", "files", "features"))
    rows = CategoryRows(a["ids"], a["paths"], a["files"], a["features"])
    if (
        rows.features.ndim != 2
        or rows.features.shape[1] != dim
        or len(rows.ids) != len(rows.features)
    ):
        raise DatabaseError(
            f"{path} holds features of shape {rows.features.shape}, expected (n, {dim}); "
            "run 'cbir check --repair'"
        )
    return rows


def _open_catalog(path: Path) -> CatalogDB:
    try:
        return CatalogDB.open(path)
    except CatalogError as exc:
        raise _damaged(path, exc) from exc


def _catalog_call(db_dir: Path, method: Callable[..., T], *args: object) -> T:
    """A catalog read or write; a damaged file is named, with the fix."""
    try:
        return method(*args)
    except CatalogError as exc:
        raise _damaged(db_dir / CATALOG_NAME, exc) from exc


def _merged(recorded: str, new: str) -> str:
    parts = [p for p in recorded.split("+") if p]
    return "+".join(parts if new in parts else [*parts, new])


def _hard_link(source: Path, target: Path, db_dir: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise CbirError(
                f"cannot hard-link {source} into {db_dir}: different file systems; "
                "use --link copy or --link symlink"
            ) from exc
        raise


def _copy_new(source: Path, target: Path) -> None:
    """Copy to a temporary name and rename; FileExistsError when `target` is already there."""
    if os.path.lexists(target):
        raise FileExistsError(target)
    tmp = _tmp_name(target)
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _try_link(existing: Path, new: Path) -> bool:
    """Hard-link `new` to `existing`; False where the file system cannot (FAT, some shares)."""
    try:
        os.link(existing, new)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise
    return True


def _category_writer(rows: CategoryRows) -> Writing:
    return _npz_writer(**_columns(rows))


def stored_name(source_path: Path, sha256: str) -> str:
    """A readable file name that never collides: two different IMG_0001.jpg get two names."""
    stem = source_path.stem[:80]
    return f"{stem}-{sha256[:10]}{source_path.suffix.lower()}"


class Writer(Database):
    """Exclusive write access; use `open_writer` as a context manager."""

    def __init__(self, db_dir: Path, manifest: Manifest) -> None:
        super().__init__(db_dir, manifest)
        self._pending_removals: set[str] = set()  # categories that may hold removed images
        self._folders: set[Path] = set()  # category folders known to exist
        # The catalog's image count, kept by each commit: counting costs a scan of the
        # catalog (24 ms at a million images), and the manifest takes it at every commit.
        self._n_images: int | None = None

    def _catalog_db(self) -> CatalogDB:
        """The catalog file, opened on first use; before that, a database of format 1 or 2 is
        converted: catalog.sqlite is written whole and renamed into place, then the manifest
        says format 3 (an older cbir must refuse the database from then on, not miss the
        new files), then catalog.npz goes. Every write goes through here first."""
        if self._catalog_file is None:
            path = self.db_dir / CATALOG_NAME
            if not path.exists():
                self._replace_catalog_file(self._legacy_catalog())
            self._declare_format()
            with contextlib.suppress(FileNotFoundError):
                (self.db_dir / LEGACY_CATALOG_NAME).unlink()
            if self._catalog_file is None:
                self._catalog_file = _open_catalog(path)
        return self._catalog_file

    def _replace_catalog_file(self, catalog: Catalog) -> None:
        """Write `catalog` as a new catalog file, atomically (the old one may be damaged)."""
        path = self.db_dir / CATALOG_NAME
        tmp = _tmp_name(path)
        try:
            CatalogDB.write_new(tmp, catalog)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if self._catalog_file is not None:
                self._catalog_file.close()
                self._catalog_file = None
            os.replace(tmp, path)
            _fsync_dir(self.db_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._snapshot = None
        self._n_images = None

    def n_images(self) -> int:
        if self._n_images is None:
            self._n_images = super().n_images()
        return self._n_images

    @property
    def catalog(self) -> Catalog:
        """The whole catalog in memory, read now: a writer's catalog changes."""
        return _catalog_call(self.db_dir, self._catalog_db().snapshot, self.settings.top_k)

    # -- adding -----------------------------------------------------------------------------

    def record_engine(self, engine: str, precision: str) -> None:
        """Note which engine and precision computed features (saved with the next commit);
        a database extended with another one lists both, e.g. "openvino+tensorflow"."""
        s = self.manifest.settings
        self.manifest.settings = replace(
            s, engine=_merged(s.engine, engine), precision=_merged(s.precision, precision)
        )

    def lookup_path(self, path: str, size: int, mtime_ns: int) -> int | None:
        """The image id of an unchanged, already indexed file, else None."""
        rec = _catalog_call(self.db_dir, self._catalog_db().path_record, path)
        if rec is not None and rec.size == size and rec.mtime_ns == mtime_ns:
            return rec.image_id
        return None

    def has_image(self, sha256: str) -> bool:
        return _catalog_call(self.db_dir, self._catalog_db().has_image, image_id_of(sha256))

    def add_paths(self, entries: list[tuple[str, str, int, int]]) -> None:
        """Remember more source paths (path, sha256, size, mtime_ns) of images already indexed."""
        if not entries:
            return
        self._commit(paths=[
            (path, PathRecord(image_id_of(sha), size, mtime)) for path, sha, size, mtime in entries
        ])  # fmt: skip

    def place_copies(self, images: Iterable[NewImage]) -> None:
        """Store the copies of described images ahead of their commit, so that copying overlaps
        with describing the next ones. Until committed they are orphans, which the repair
        after a crash removes; `add_images` keeps copies already placed."""
        for img in images:
            with contextlib.suppress(FileNotFoundError):  # source gone: add_images drops it
                self._place(img)

    def add_images(self, new: list[NewImage]) -> None:
        """Store a chunk of new images and commit it (see the module docstring for the order)."""
        new = [img for img in new if not self.has_image(img.sha256)]  # also opens the catalog
        if not new:
            return
        dim = self.settings.feature_dim
        placed: list[NewImage] = []
        for img in new:
            try:
                self._place(img)
            except FileNotFoundError:  # deleted since it was read: not indexed
                self._pending_removals.update(img.wnids)  # the commit drops copies made
                continue
            placed.append(img)
        new = placed
        by_wnid: dict[str, list[NewImage]] = {}
        for img in new:
            for wnid in img.wnids:
                by_wnid.setdefault(wnid, []).append(img)

        def new_segments() -> Iterator[tuple[Path, Writing]]:
            for wnid, imgs in sorted(by_wnid.items()):
                folder = self.category_dir(wnid)
                seq = next_segment_number(*category_segments(folder))
                added = CategoryRows(
                    np.array([i.image_id for i in imgs], np.int64),
                    np.array([str(i.source_path) for i in imgs], np.str_),
                    np.array([stored_name(i.source_path, i.sha256) for i in imgs], np.str_),
                    np.stack([i.feature for i in imgs]).astype(np.float32).reshape(len(imgs), dim),
                )
                yield folder / f"features.{seq}-{seq}.npz", _category_writer(added)

        _write_many_atomic(new_segments())  # its first sync also makes the copies durable
        self._commit(
            images=[NewRecord(i.image_id, i.sha256, stored_name(i.source_path, i.sha256),
                              i.wnids, i.probs) for i in new],
            paths=[(str(i.source_path), PathRecord(i.image_id, i.size, i.mtime_ns)) for i in new],
        )  # fmt: skip
        self._merge_segments(sorted(by_wnid))

    def _write_manifest(self) -> None:
        _write_manifest(self.db_dir, self.manifest)

    def _declare_format(self) -> None:
        """The manifest says this cbir's format before the first file of it is written: an
        older cbir must refuse the database from then on, not miss the new files."""
        if self.manifest.format_version < FORMAT_VERSION:
            self.manifest.format_version = FORMAT_VERSION
            self._write_manifest()

    def _merge_segments(self, wnids: list[str]) -> None:
        """Merge each category's newest segments while the one before them is at most twice
        their size together (file sizes stand for row counts: features are most of a file)."""
        merges: list[tuple[str, Path, list[Segment]]] = []
        for wnid in wnids:
            live, _ = category_segments(self.category_dir(wnid))
            sizes = [seg.path.stat().st_size for seg in live]
            first, newer = len(live) - 1, sum(sizes[-1:])
            while first > 0 and sizes[first - 1] <= 2 * newer:
                first -= 1
                newer += sizes[first]
            if first < len(live) - 1:
                tail = live[first:]
                name = f"features.{tail[0].lo}-{tail[-1].hi}.npz"
                merges.append((wnid, tail[0].path.with_name(name), tail))
        if not merges:
            return  # and no syncs
        dim = self.settings.feature_dim
        _write_many_atomic(
            (target, _merging_writer([seg.path for seg in tail], dim, self.members(wnid)))
            for wnid, target, tail in merges
        )
        for _, _, tail in merges:
            for seg in tail:
                seg.path.unlink()

    def _place(self, img: NewImage) -> None:
        """Copy or link the image's source into each of its category folders; an existing
        entry is kept (its name holds the content hash, so it has the same content).

        Links are made under their final name (making a link is atomic); a copy is written to
        a temporary name and renamed. With link="copy" the file is copied once and the other
        categories' entries are hard links to that copy: one file's disk space instead of k.
        Where the file system has no hard links, each entry is a full copy.
        """
        link, source = self.settings.link, img.source_path
        name = stored_name(source, img.sha256)
        placed: Path | None = None
        for target in (self.category_dir(w) / name for w in img.wnids):
            if target.parent not in self._folders:
                target.parent.mkdir(exist_ok=True)
                self._folders.add(target.parent)
            with contextlib.suppress(FileExistsError):
                if link == "hardlink":
                    _hard_link(source, target, self.db_dir)
                elif link == "symlink":
                    os.symlink(source.resolve(), target)
                elif placed is None or not _try_link(placed, target):
                    _copy_new(source, target)
            placed = placed or target

    # -- removing ---------------------------------------------------------------------------

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Forget source paths; images left with no path are removed. Returns images removed."""
        n_before = self.n_images()
        self._commit(forget=paths)
        return n_before - self.n_images()

    # -- committing -------------------------------------------------------------------------

    def _commit(
        self,
        images: Iterable[NewRecord] = (),
        paths: Iterable[tuple[str, PathRecord]] = (),
        forget: Iterable[str] = (),
    ) -> None:
        """Commit to the catalog (the commit point; see `CatalogDB.commit`), then tidy what
        removals left behind and update the manifest."""
        n_before = self.n_images()
        done = _catalog_call(self.db_dir, self._catalog_db().commit, images, paths, forget)
        self._n_images = n_before + done.added - done.dropped
        self._pending_removals.update(done.dropped_from)
        if self._pending_removals:
            self._drop_uncommitted_rows(sorted(self._pending_removals))
            self._pending_removals.clear()
        self.manifest.n_images = self.n_images()
        self.manifest.updated = now_iso()
        self._write_manifest()

    def _drop_uncommitted_rows(self, wnids: list[str] | None = None) -> None:
        """Remove category rows and stored copies of images the catalog does not list.

        Only the categories in `wnids` are visited, or every category folder when None.
        """
        if wnids is None:
            folders = list(self._category_folders())
        else:
            folders = [d for d in map(self.category_dir, wnids) if d.is_dir()]
        dim = self.settings.feature_dim
        for folder in folders:
            committed = self.members(categories.wnid_of_folder(folder.name))
            live, _ = category_segments(folder)
            wanted = set()
            for seg in live:
                rows = read_category_file(seg.path, dim)
                keep = np.isin(rows.ids, committed)
                if keep.any():
                    wanted |= {seg.path.name, *rows.files[keep].tolist()}
                    if not keep.all():
                        _write_atomic(seg.path, _category_writer(rows.select(keep)))
            for entry in folder.iterdir():  # stale segments and rows' copies go too
                if entry.name not in wanted:
                    entry.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()  # empty category folders go
                self._folders.discard(folder)

    def set_catalog(self, catalog: Catalog) -> None:
        """Replace the whole catalog (check --repair): written as a new file, renamed."""
        self._replace_catalog_file(catalog)
        self._catalog_db()  # opens it, and removes a catalog.npz
        self._commit()

    def _category_folders(self) -> Iterator[Path]:
        for entry in sorted(self.db_dir.iterdir()):
            if entry.is_dir() and entry.name[:1] == "n" and "_" in entry.name:
                yield entry

    def repair(self) -> None:
        """Bring the files back in line with the catalog after an interrupted write."""
        for folder in self._category_folders():
            for tmp in folder.glob(".tmp-*"):
                tmp.unlink()
        for tmp in self.db_dir.glob(".tmp-*"):
            tmp.unlink()
        self._drop_uncommitted_rows()


def check_database(
    db_dir: Path,
    repair: bool = False,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> list[str]:
    """Verify every file against the catalog and manifest; with `repair`, fix what can be fixed.

    Returns one line per problem found (with what was done about it when repairing). Category
    files are rebuilt from the rows of other categories (an image's feature is stored in each of
    its k categories), stored copies from other copies or the source file, and a damaged catalog
    from the category files. Images with nothing left to rebuild them from are dropped, so that
    running the same create-db or add again re-indexes them.
    """
    with open_writer(db_dir, wait=wait, on_wait=on_wait, repair_interrupted=False) as writer:
        return _Checker(writer, repair).run()


class _Checker:
    def __init__(self, writer: Writer, repair: bool) -> None:
        self.w, self.repair, self.problems = writer, repair, []
        self.dim = writer.settings.feature_dim
        self.catalog = Catalog.empty(writer.settings.top_k)  # read (or rebuilt) by run()

    def say(self, what: str, fix: str = "") -> None:
        self.problems.append(f"{what}; {fix}" if self.repair and fix else what)

    def run(self) -> list[str]:
        w = self.w
        rows_by_folder: dict[str, CategoryRows] = {}
        for folder in w._category_folders():
            try:
                rows_by_folder[folder.name] = read_category_folder(folder, self.dim)
            except FileNotFoundError:
                self.say(f"{folder} has no features file", "rebuilt from other categories")
            except DatabaseError as exc:
                self.say(str(exc).split("; run")[0], "rebuilt from other categories")
            stale = [seg.path for seg in category_segments(folder)[1]]
            for leftover in [*folder.glob(".tmp-*"), *stale]:
                self.say(f"{leftover} is a leftover of an interrupted write", "deleted")
        try:
            self.catalog = catalog = w.catalog
        except DatabaseError as exc:
            self.say(str(exc).split("; run")[0], "rebuilt from the category files")
            self.catalog = catalog = self._catalog_from_rows(rows_by_folder)
        features: dict[int, npt.NDArray[np.float32]] = {}
        for rows in rows_by_folder.values():
            features.update(zip(rows.ids.tolist(), rows.features, strict=True))
        dropped = []
        for image_id, rec in sorted(catalog.images.items()):
            copy = self._find_copy(rec)
            if image_id not in features or copy is None:
                self.say(f"image {rec.stored_name} has no features or stored copy left",
                         "dropped: run the same create-db or add again to re-index it")  # fmt: skip
                dropped.append(image_id)
                continue
            for wnid in rec.wnids:
                folder = w.category_dir(wnid)
                rows = rows_by_folder.get(folder.name)
                if rows is not None and image_id not in rows.ids:
                    self.say(f"image {rec.stored_name} has no feature row in {folder}",
                             "row restored")  # fmt: skip
                if not (folder / rec.stored_name).exists():
                    self.say(f"{folder / rec.stored_name} is missing", "copied again")
        committed = set(catalog.images) - set(dropped)
        for name, rows in rows_by_folder.items():
            stray = [i for i in rows.ids.tolist() if i not in committed]
            if stray:
                self.say(f"{w.db_dir / name} has {len(stray)} feature rows of images "
                         "the catalog does not list (an interrupted write)", "removed")  # fmt: skip
        if w.manifest.n_images != len(committed):
            self.say(f"manifest counts {w.manifest.n_images} images, the catalog {len(committed)}",
                     "corrected")  # fmt: skip
        if self.repair and self.problems:
            self._rebuild(features, dropped)
        return self.problems

    def _find_copy(self, rec: ImageRecord) -> Path | None:
        """An existing file with this image's content: a stored copy, else a source path."""
        for wnid in rec.wnids:
            candidate = self.w.category_dir(wnid) / rec.stored_name
            if candidate.is_file():
                return candidate
        for path in self.catalog.sources_of(image_id_of(rec.sha256)):
            if Path(path).is_file():
                return Path(path)
        return None

    def _catalog_from_rows(self, rows_by_folder: dict[str, CategoryRows]) -> Catalog:
        images: dict[int, ImageRecord] = {}
        paths: dict[str, PathRecord] = {}
        for name, rows in sorted(rows_by_folder.items()):
            wnid = categories.wnid_of_folder(name)
            for image_id, path, file in zip(rows.ids.tolist(), rows.paths, rows.files, strict=True):
                rec = images.get(image_id)
                if rec is None:
                    stored = self.w.db_dir / name / str(file)
                    if not stored.is_file() or image_id_of(sha := file_sha256(stored)) != image_id:
                        continue
                    rec = ImageRecord(sha, str(file), (), ())
                    paths[str(path)] = PathRecord(image_id, -1, -1)  # re-checked next run
                # probabilities are lost with the catalog: only the order of categories is not
                images[image_id] = replace(rec, wnids=(*rec.wnids, wnid), probs=(*rec.probs, 0.0))
        return Catalog(ImageTable.of(images, self.w.settings.top_k), PathTable.of(paths))

    def _rebuild(self, features: dict[int, npt.NDArray[np.float32]], dropped: list[int]) -> None:
        w = self.w
        images = self.catalog.images.select(~np.isin(self.catalog.images.ids, dropped))
        paths = self.catalog.paths.select(np.isin(self.catalog.paths.ids, images.ids))
        self.catalog = catalog = Catalog(images, paths)
        primary = {i: ps[0] for i, ps in catalog.paths_of().items()}
        w._declare_format()  # before the first segment is written
        for wnid, members in sorted(catalog.members().items()):
            ids = members.tolist()  # sorted: the index lists ids in order
            folder = w.category_dir(wnid)
            folder.mkdir(exist_ok=True)
            for image_id in ids:
                rec = catalog.images[image_id]
                target = folder / rec.stored_name
                if not target.exists():
                    source = self._find_copy(rec)
                    if source is not None:
                        shutil.copyfile(source, target)
            live, stale = category_segments(folder)
            whole = f"features.0-{next_segment_number(live, stale)}.npz"
            _write_atomic(folder / whole, _category_writer(CategoryRows(
                np.array(ids, np.int64),
                np.array([primary[i] for i in ids], np.str_),
                np.array([catalog.images[i].stored_name for i in ids], np.str_),
                np.stack([features[i] for i in ids]).astype(np.float32),
            )))  # fmt: skip
            for seg in live + stale:
                seg.path.unlink()  # all inside the new segment's range
        w.set_catalog(catalog)
        w.repair()


FEATURE_BLOCK_ROWS = 512  # rows of an old category file's features in memory at a time


def _merging_writer(sources: list[Path], dim: int, committed: npt.NDArray[np.int64]) -> Writing:
    """Writes one category file with the committed rows of the files `sources`, in order.

    The features, the bulk of each file, are streamed through in blocks, so memory does not
    grow with the category: (r, d) float32 would otherwise be held three times over.
    """

    def write(f: io.BufferedWriter) -> None:
        with contextlib.ExitStack() as stack:
            olds, keeps, columns = [], [], {"ids": [], "paths": [], "files": []}
            for path in sources:
                try:
                    old = stack.enter_context(zipfile.ZipFile(path))
                    small = {name: _read_member(old, name) for name in columns}
                except _DAMAGE as exc:
                    raise _damaged(path, exc) from exc
                keep = np.isin(small["ids"], committed)
                for name, parts in columns.items():
                    parts.append(small[name][keep])
                olds.append(old)
                keeps.append(keep)
            new = stack.enter_context(
                zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1)
            )
            for name, parts in columns.items():
                _write_member(new, name, np.concatenate(parts))
            shape = (sum(int(keep.sum()) for keep in keeps), dim)
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            with new.open("features.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for path, old, keep in zip(sources, olds, keeps, strict=True):
                    try:
                        _copy_features(old, path, dim, keep, member)
                    except _DAMAGE as exc:
                        raise _damaged(path, exc) from exc

    return write


def _copy_features(
    old: zipfile.ZipFile, path: Path, dim: int, keep: npt.NDArray[np.bool_], out: IO[bytes]
) -> None:
    """Streams the rows of `old`'s features that `keep` selects into `out`, in blocks."""
    with old.open("features.npy") as source:
        rows = _features_header(source, path, dim, len(keep))
        for start in range(0, rows, FEATURE_BLOCK_ROWS):
            n = min(FEATURE_BLOCK_ROWS, rows - start)
            block = np.frombuffer(source.read(n * dim * 4), "<f4")
            if block.size != n * dim:
                raise EOFError("features end early")
            out.write(block.reshape(n, dim)[keep[start : start + n]].tobytes())


def _columns(rows: CategoryRows) -> dict[str, np.ndarray]:
    """The arrays of a category file, in the order they are written (features last)."""
    return {
        "ids": rows.ids.astype(np.int64),
        "paths": rows.paths.astype(np.str_),
        "files": rows.files.astype(np.str_),
        "features": np.ascontiguousarray(rows.features, np.float32),
    }


def _read_member(npz: zipfile.ZipFile, name: str) -> np.ndarray:
    with npz.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _features_header(member: IO[bytes], path: Path, dim: int, n_ids: int) -> int:
    """Reads the .npy header of a category file's features; returns its row count."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran or dtype != np.dtype("<f4") or shape != (n_ids, dim):
        raise DatabaseError(
            f"{path} holds features of shape {shape} ({dtype}), expected ({n_ids}, {dim}) "
            "float32; run 'cbir check --repair'"
        )
    return int(shape[0])


@contextlib.contextmanager
def open_writer(
    db_dir: Path,
    settings: Settings | None = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    repair_interrupted: bool = True,
) -> Iterator[Writer]:
    """Lock the database for writing, creating it from `settings` if it does not exist yet.

    With `settings` given and a database already there, its backbone and weights must match.
    A second writer waits (calling `on_wait` once with a message) or, with wait=False, fails.
    """
    exists = (db_dir / MANIFEST_NAME).exists()
    if not exists:
        if settings is None:
            read_manifest(db_dir)  # raises the right "no database" error
        db_dir.mkdir(parents=True, exist_ok=True)
    with _locked(db_dir, wait, on_wait):
        if (db_dir / MANIFEST_NAME).exists() or settings is None:
            manifest = read_manifest(db_dir)
            if settings is not None:
                check_compatible(db_dir, manifest.settings, settings.backbone, settings.weights)
        elif settings is not None:
            manifest = Manifest(settings, now_iso(), now_iso())
            _write_manifest(db_dir, manifest)
        with contextlib.closing(Writer(db_dir, manifest)) as writer:
            marker = db_dir / WRITING_NAME
            if not repair_interrupted:
                yield writer
                return
            if marker.exists():
                writer.repair()
            marker.touch()
            yield writer
            marker.unlink()


@contextlib.contextmanager
def _locked(db_dir: Path, wait: bool, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    with open(db_dir / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"another cbir process is writing to {db_dir}"
            if not wait:
                raise DatabaseLocked(f"{message} (not waiting: --no-wait)") from None
            if on_wait is not None:
                on_wait(f"{message}; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_compatible(db_dir: Path, settings: Settings, backbone: str, weights: str) -> None:
    """Refuse to mix features of two models in one database or query."""
    if (settings.backbone, settings.weights) != (backbone, weights):
        raise DatabaseError(
            f"{db_dir} was built with --model {settings.backbone} --weights {settings.weights}, "
            f"not --model {backbone} --weights {weights}: features of different models cannot "
            f"be compared (use --model {settings.backbone}, or build a new database)"
        )
