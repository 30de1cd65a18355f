"""The whole catalog in memory: every committed image and every source path, as sorted columns.

For the tools that go through every image (check, evaluate, remove, sync, tests) and for reading
the catalog.npz of older databases. Columns cost about 0.5 KB an image, where per-image Python
objects (a record, tuples, a dict entry) cost 1.5 KB. Tables are immutable (their arrays are
read-only). The catalog on disk, and what a writer asks of it, is `cbir.catalogdb`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ImageRecord:
    sha256: str
    stored_name: str
    wnids: tuple[str, ...]  # its categories, most probable first
    probs: tuple[float, ...]  # their probabilities (0.0 when lost in a repair)


@dataclass(frozen=True, slots=True)
class PathRecord:
    image_id: int
    size: int
    mtime_ns: int


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _positions(
    sorted_keys: np.ndarray, keys: np.ndarray
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Where each of `keys` is (or would go) in `sorted_keys`, and whether it is there."""
    pos = np.searchsorted(sorted_keys, keys)
    if not len(sorted_keys):
        return pos, np.zeros(len(keys), bool)
    found = sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys
    return pos, np.asarray(found, bool) & (pos < len(sorted_keys))


def _sorted_by(keys: np.ndarray) -> npt.NDArray[np.intp] | None:
    """The order that sorts `keys`, or None when they are sorted already (the usual case)."""
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    return np.argsort(keys, kind="stable")


class ImageTable(Mapping[int, ImageRecord]):
    """Images by id: ids (n,) int64, sorted and unique; sha256 (n,) S64 hex digests;
    stored_names (n,) object (str); wnids (n, k) U9, '' after an image's last category;
    probs (n, k) float32."""

    def __init__(
        self,
        ids: np.ndarray,
        sha256: np.ndarray,
        stored_names: np.ndarray,
        wnids: np.ndarray,
        probs: np.ndarray,
    ) -> None:
        columns = [ids, sha256, stored_names, wnids, probs]
        order = _sorted_by(ids)
        if order is not None:
            columns = [c[order] for c in columns]
        self.ids, self.sha256, self.stored_names, self.wnids, self.probs = map(_frozen, columns)

    @classmethod
    def empty(cls, k: int) -> ImageTable:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, "S64"),
            np.zeros(0, object),
            np.zeros((0, k), "U9"),
            np.zeros((0, k), np.float32),
        )

    @classmethod
    def of(cls, records: Mapping[int, ImageRecord], k: int) -> ImageTable:
        ids = sorted(records)
        recs = [records[i] for i in ids]
        return cls(
            np.array(ids, np.int64),
            np.array([r.sha256 for r in recs], "S64"),
            str_objects(r.stored_name for r in recs),
            np.array([_pad(r.wnids, k, "") for r in recs], "U9").reshape(len(recs), k),
            np.array([_pad(r.probs, k, 0.0) for r in recs], np.float32).reshape(len(recs), k),
        )

    @property
    def k(self) -> int:
        return int(self.wnids.shape[1])

    def __getitem__(self, image_id: int) -> ImageRecord:
        pos, found = _positions(self.ids, np.array([image_id], np.int64))
        if not found[0]:
            raise KeyError(image_id)
        i = int(pos[0])
        wnids = tuple(w for w in self.wnids[i].tolist() if w)
        probs = tuple(self.probs[i, : len(wnids)].tolist())
        return ImageRecord(self.sha256[i].decode(), self.stored_names[i], wnids, probs)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, (int, np.integer)):
            return False
        return bool(_positions(self.ids, np.array([image_id], np.int64))[1][0])

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: npt.NDArray[np.bool_]) -> ImageTable:
        return ImageTable(
            self.ids[keep], self.sha256[keep], self.stored_names[keep],
            self.wnids[keep], self.probs[keep],
        )  # fmt: skip


class PathTable(Mapping[str, PathRecord]):
    """Source paths: strings (m,) object (str), sorted and unique; ids, sizes, mtimes (m,)
    int64: the image each path points at, and the file's size and mtime_ns when indexed."""

    def __init__(
        self, strings: np.ndarray, ids: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray
    ) -> None:
        columns = [strings, ids, sizes, mtimes]
        order = _sorted_by(strings)
        if order is not None:
            columns = [c[order] for c in columns]
        self.strings, self.ids, self.sizes, self.mtimes = map(_frozen, columns)

    @classmethod
    def empty(cls) -> PathTable:
        return cls.of({})

    @classmethod
    def of(cls, records: Mapping[str, PathRecord]) -> PathTable:
        paths = sorted(records)
        recs = [records[p] for p in paths]
        return cls(
            str_objects(paths),
            np.array([r.image_id for r in recs], np.int64),
            np.array([r.size for r in recs], np.int64),
            np.array([r.mtime_ns for r in recs], np.int64),
        )

    def __getitem__(self, path: str) -> PathRecord:
        pos, found = _positions(self.strings, str_objects([path]))
        if not found[0]:
            raise KeyError(path)
        i = int(pos[0])
        return PathRecord(int(self.ids[i]), int(self.sizes[i]), int(self.mtimes[i]))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and bool(_positions(self.strings, str_objects([path]))[1][0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.strings.tolist())

    def __len__(self) -> int:
        return len(self.strings)

    def select(self, keep: npt.NDArray[np.bool_]) -> PathTable:
        return PathTable(self.strings[keep], self.ids[keep], self.sizes[keep], self.mtimes[keep])


@dataclass(frozen=True)
class Catalog:
    """Every committed image (by id) and every source path that points at one."""

    images: ImageTable
    paths: PathTable

    @classmethod
    def empty(cls, k: int) -> Catalog:
        return cls(ImageTable.empty(k), PathTable.empty())

    def paths_of(self) -> dict[int, list[str]]:
        """image id -> its source paths, sorted."""
        by_id: dict[int, list[str]] = {}
        for path, image_id in zip(
            self.paths.strings.tolist(), self.paths.ids.tolist(), strict=True
        ):
            by_id.setdefault(image_id, []).append(path)
        return by_id

    def members(self) -> dict[str, npt.NDArray[np.int64]]:
        """wnid -> (m,) sorted ids of the images stored in that category."""
        wnids = self.images.wnids
        flat = wnids.reshape(-1)
        owners = np.repeat(self.images.ids, wnids.shape[1])
        keep = flat != ""
        flat, owners = flat[keep], owners[keep]
        if not len(flat):
            return {}
        order = np.argsort(flat, kind="stable")
        names, starts = np.unique(flat[order], return_index=True)
        groups = np.split(owners[order], starts[1:])
        return dict(zip(names.tolist(), groups, strict=True))

    def sources_of(self, image_id: int) -> list[str]:
        return self.paths.strings[self.paths.ids == image_id].tolist()


def str_objects(strings: Iterable[str]) -> npt.NDArray[np.object_]:
    """A 1-D object array of Python strings (np.array would make a fixed-width U array,
    4 bytes per character of the longest one)."""
    items = list(strings)
    array = np.empty(len(items), object)
    array[:] = items
    return array


def _pad(values: tuple, k: int, filler: object) -> list:
    return [*values[:k], *[filler] * (k - len(values))]
