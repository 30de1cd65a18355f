"""Read access to a database: its manifest, catalog, search matrix and category folders.

Readers take no lock. The catalog's committed state says which rows of the matrix and which
category files count; anything else a writer is busy with is invisible to them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from stat import S_ISREG

import numpy as np
import numpy.typing as npt

from cbir import categories
from cbir.centring import Centre
from cbir.db import ivf
from cbir.db.catalog import CATALOG_NAME, Catalog, ImageRecord, PathRecord
from cbir.db.manifest import Manifest, Settings, read_manifest
from cbir.db.matrix import MATRIX_FILES, SearchMatrix
from cbir.errors import DatabaseError

MATRIX_OPEN_ATTEMPTS = 5  # a compaction may replace the matrix file between two reads


class Database:
    """A database opened for reading. `close()` (or `with`) releases its files."""

    def __init__(self, db_dir: Path, manifest: Manifest) -> None:
        self.db_dir = db_dir
        self.manifest = manifest
        self._catalog: Catalog | None = None
        self._matrix: SearchMatrix | None = None
        self._ivf: tuple[int, ivf.InvertedFile] | None = None  # (generation, the file)
        self._centre: tuple[int, Centre | None] | None = None  # (sums version, centre)
        self._head: tuple[int, npt.NDArray[np.float32] | None] | None = None  # (version, head)

    @classmethod
    def open(cls, db_dir: Path) -> Database:
        return cls(Path(db_dir), read_manifest(Path(db_dir)))

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._centre = self._head = None
        if self._matrix is not None:
            self._matrix.close()
            self._matrix = None
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    @property
    def settings(self) -> Settings:
        return self.manifest.settings

    @property
    def catalog(self) -> Catalog:
        """The catalog, opened on first use."""
        if self._catalog is None:
            self._catalog = Catalog.open(self.db_dir / CATALOG_NAME, writable=True)
        return self._catalog

    def matrix(self) -> SearchMatrix:
        """The committed rows of the search matrix as of now (re-opened when a writer has
        committed more rows or a new generation since it was last opened)."""
        for _ in range(MATRIX_OPEN_ATTEMPTS):
            generation, n_rows = self.catalog.matrix_state()
            path = self.db_dir / MATRIX_FILES.name(generation)
            m = self._matrix
            if m is not None and m.path == path and m.n_rows == n_rows:
                return m
            try:
                opened = SearchMatrix(path, self.settings.feature_dim, n_rows)
            except DatabaseError:
                if self.catalog.matrix_state()[0] != generation:
                    continue  # compacted meanwhile: open the new one
                raise
            if m is not None:
                m.close()
            self._matrix = opened
            return opened
        raise DatabaseError(f"the search matrix of {self.db_dir} kept changing; try again")

    def ivf(self) -> ivf.InvertedFile | None:
        """The inverted file (cbir.db.ivf), or None while the database has none."""
        generation, _ = self.catalog.ivf_state()
        if generation == 0:
            return None
        if self._ivf is None or self._ivf[0] != generation:
            path = self.db_dir / ivf.IVF_FILES.name(generation)
            try:
                self._ivf = generation, ivf.InvertedFile.read(path, self.settings.feature_dim)
            except FileNotFoundError:
                raise DatabaseError(f"{path} is missing; run 'cbir check --repair'") from None
        return self._ivf[1]

    # -- what a query needs -----------------------------------------------------------------

    def centre(self) -> Centre | None:
        """The mean feature and category centroids of the committed images (cbir.centring),
        from the catalog's feature sums; None for a database too small to centre. Read again
        only when the sums have changed (call inside the query's catalog snapshot)."""
        catalog = self.catalog
        version = catalog.sums_version()
        if self._centre is None or self._centre[0] != version:
            sums = catalog.feature_sums(self.settings.feature_dim)
            centre = Centre.from_sums(sums, catalog.category_sizes(), catalog.n_images())
            self._centre = version, centre
        return self._centre[1]

    def query_head(self) -> npt.NDArray[np.float32] | None:
        """The query head (d, d) `cbir train` learned (cbir.centring), or None. Read again
        only when it has changed (call inside the query's catalog snapshot)."""
        version = self.catalog.head_version()
        if self._head is None or self._head[0] != version:
            found = self.catalog.query_head(self.settings.feature_dim)
            self._head = version, None if found is None else found[0]
        return self._head[1]

    def head_provenance(self) -> dict | None:
        """What the query head was trained on, how and when; None without one."""
        found = self.catalog.query_head(self.settings.feature_dim)
        return None if found is None else found[1]

    def category_dir(self, wnid: str) -> Path:
        if not categories.is_wnid(wnid):
            raise DatabaseError(f"{self.db_dir} names an unknown category {wnid[:40]!r}; "
                                "run 'cbir check --repair'")  # fmt: skip
        return self.db_dir / categories.folder_name(wnid)

    def stored_path(self, record: ImageRecord) -> Path:
        """The stored copy of an image in its first category (names are checked on read)."""
        return self.category_dir(record.wnids[0]) / record.stored_name

    def n_images(self) -> int:
        return self.catalog.n_images()

    def n_paths(self) -> int:
        """How many source paths point at the database's images (>= the number of images)."""
        return self.catalog.n_paths()

    def category_sizes(self) -> dict[str, int]:
        """wnid -> number of committed images in it (no category file is read)."""
        return self.catalog.category_sizes()

    def members(self, wnid: str) -> npt.NDArray[np.int64]:
        """(m,) sorted ids of the committed images stored in category `wnid`."""
        return self.catalog.members(wnid)

    def image(self, image_id: int) -> ImageRecord | None:
        return self.catalog.image(image_id)

    def images(self) -> Iterator[ImageRecord]:
        """Every committed image, by id (streamed from the catalog)."""
        return self.catalog.images()

    def paths(self) -> Iterator[tuple[str, PathRecord]]:
        """Every source path, sorted (streamed from the catalog)."""
        return self.catalog.paths()

    def paths_of(self, image_id: int) -> list[str]:
        return self.catalog.paths_of(image_id)

    def disk_bytes(self) -> int:
        """Bytes the database takes on disk; hard-linked copies are counted once."""
        sizes: dict[tuple[int, int], int] = {}
        for folder, _, names in os.walk(self.db_dir):
            for name in names:
                info = os.lstat(os.path.join(folder, name))
                if S_ISREG(info.st_mode):
                    sizes[info.st_dev, info.st_ino] = info.st_size
        return sum(sizes.values())


LISTS_READ_AT_ONCE = 4  # inverted lists a gate reads from the catalog in one query


class CategoryMembers(Mapping[str, npt.NDArray[np.int64]]):
    """wnid -> (m,) sorted matrix rows of the committed images stored in that category, and
    the rows of inverted lists. Read from the catalog when first asked for: a query needs a
    few categories or lists, not all."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.sizes = db.category_sizes()  # wnid -> how many images, read once
        self._members: dict[str, npt.NDArray[np.int64]] = {}
        self._lists: dict[int, npt.NDArray[np.int64]] = {}  # inverted list -> its sorted rows

    def __getitem__(self, wnid: str) -> npt.NDArray[np.int64]:
        if wnid not in self.sizes:
            raise KeyError(wnid)
        if wnid not in self._members:
            self._members[wnid] = self._db.catalog.rows_of_categories([wnid])
        return self._members[wnid]

    def read_ahead(self, order: Sequence[str], enough: int) -> None:
        """Read, in one catalog query, the members of the first categories of `order` that
        together hold `enough` images (counted once per category): what a gate walking
        `order` needs at least."""
        wanted, total = [], 0
        for wnid in order:
            if total >= enough:
                break
            if wnid in self.sizes:
                total += self.sizes[wnid]
                if wnid not in self._members:
                    wanted.append(wnid)
        self._members.update(self._db.catalog.rows_by_category(wanted))

    def rows_of_lists(self, lists: Sequence[int]) -> npt.NDArray[np.int64]:
        """(r,) sorted matrix rows of the images in the inverted `lists` (each in one)."""
        for lst in lists:
            if lst not in self._lists:
                self._lists[lst] = self._db.catalog.rows_of_lists([lst])
        return np.sort(np.concatenate([np.zeros(0, np.int64), *(self._lists[x] for x in lists)]))

    def lists_until(self, order: Sequence[int], enough: int) -> tuple[int, ...]:
        """The first lists of `order` (best first) that together hold `enough` images (all
        of them in a smaller database), read a few at a time: a gate walks 4-6 of 264 at
        70k images."""
        chosen: list[int] = []
        total = 0
        for start in range(0, len(order), LISTS_READ_AT_ONCE):
            part = [int(x) for x in order[start : start + LISTS_READ_AT_ONCE]]
            for lst, rows in self._db.catalog.rows_by_list(part).items():
                self._lists[lst] = rows
            for lst in part:
                chosen.append(lst)
                total += len(self._lists[lst])
                if total >= enough:
                    return tuple(chosen)
        return tuple(chosen)

    def __contains__(self, wnid: object) -> bool:
        return wnid in self.sizes

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)
