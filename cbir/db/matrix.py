"""The search matrix, matrix-<generation>.f16: every image's feature once, in one file.

Rows are float16, little-endian, row-major, d values each, and have no header: the manifest
gives d, the catalog gives each image's row, the generation in use and how many rows are
committed. float16 keeps 11 bits of mantissa, more than the bf16 the default OpenVINO engine
computes in (8 bits); `cbir evaluate` measured no loss (README). The file only grows: a
commit appends its rows before the catalog's transaction that makes them committed, so rows
past the committed count are a killed writer's, never read, and overwritten by the next one.
Rows of removed images stay until dead rows outnumber live ones; then the live rows are
written to the next generation's file and the catalog points at it in one transaction.

A gated query gathers its candidates' rows with one positioned read per run of adjacent rows;
an exhaustive one reads the file once, in blocks, never every category's copy of a row. Both
hand the float16 bytes to FAISS (cbir.ranking), which scores them without a float32 copy. The
file is not memory-mapped: gathering 16k scattered rows of a 2.5 GB matrix took 270-560 ms
through a fresh map (page faults) and 25-40 ms with reads (README.md), and reads do not
make the file's pages count as the process's memory.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from cbir.db.files import GenerationFiles, damaged, open_regular, write_atomic
from cbir.errors import DatabaseError

DTYPE = np.dtype("<f2")
SCAN_BLOCK_ROWS = 16384  # rows read at a time by an exhaustive scan: 42 MB at d = 1280
READ_ROWS = 65536  # the most rows one read asks for (Linux reads at most 2 GB at once)


MATRIX_FILES = GenerationFiles("matrix-", ".f16")


class SearchMatrix:
    """The committed rows of one generation's matrix file, read-only."""

    def __init__(self, path: Path, dim: int, n_rows: int) -> None:
        self.path, self.dim, self.n_rows = path, dim, n_rows
        self._fd: int | None = None
        self._nowait = True  # the file system reads from the page cache only, on request
        if n_rows == 0:
            return
        try:
            self._fd = open_regular(path)
        except FileNotFoundError:
            raise DatabaseError(f"{path} is missing; run 'cbir check --repair'") from None
        except OSError as exc:
            raise damaged(path, f"not a regular file: {exc}") from exc
        size = os.fstat(self._fd).st_size
        if size < n_rows * dim * DTYPE.itemsize:
            self.close()
            raise damaged(path, f"{size} bytes, but the catalog has {n_rows} rows of {dim}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def gather(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(r, d) float32 features of `rows` (committed rows; sorted rows read fastest)."""
        codes = np.empty((len(rows), self.dim * DTYPE.itemsize), np.uint8)
        self.gather_codes(rows, codes)
        return codes.view(DTYPE).astype(np.float32)

    def gather_codes(self, rows: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """The float16 bytes of `rows` into `out` (r, 2d) uint8, e.g. a FAISS index's storage
        (cbir.ranking): no float32 copy is made. Adjacent rows are read together."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.n_rows or self._fd is None:
            raise damaged(self.path, "the catalog points past the matrix's committed rows")
        width = self.dim * DTYPE.itemsize
        flat = out.reshape(len(rows), width)
        # A read per run of adjacent rows, of at most READ_ROWS rows
        breaks = np.union1d(np.flatnonzero(np.diff(rows) != 1) + 1,
                            np.arange(READ_ROWS, len(rows), READ_ROWS))  # fmt: skip
        starts = np.concatenate([[0], breaks]).astype(np.int64)
        lengths = np.diff(np.concatenate([starts, [len(rows)]]))
        row_views, fd, pread = list(flat), self._fd, os.preadv  # the loop is the cost: keep it lean
        runs = zip(starts.tolist(), lengths.tolist(), rows[starts].tolist(), strict=True)
        # First from the page cache only; runs that are not there are asked of the disk all
        # at once, then read (a cold 1M matrix: 16k scattered rows in 0.5 s instead of 1.9 s)
        missing = []
        for start, n, row in runs:
            view = row_views[start] if n == 1 else flat[start : start + n]
            if self._nowait:
                try:
                    if pread(fd, [view], row * width, os.RWF_NOWAIT) == n * width:
                        continue
                except BlockingIOError:
                    pass
                except OSError as exc:  # tmpfs and others: no RWF_NOWAIT, plain reads then
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._nowait = False
            missing.append((view, n, row))
        for _, n, row in missing:
            os.posix_fadvise(fd, row * width, n * width, os.POSIX_FADV_WILLNEED)
        for view, n, row in missing:
            if pread(fd, [view], row * width) != n * width:
                raise damaged(self.path, "it ends before its committed rows")

    def read_codes(self, start: int, out: npt.NDArray[np.uint8]) -> None:
        """Rows start.. start+len(out) as float16 bytes into `out` (a block of a scan)."""
        self.gather_codes(np.arange(start, start + len(out)), out)


class MatrixAppender:
    """A writer's end of the current matrix file: appends rows past the committed ones."""

    def __init__(self, path: Path, dim: int, committed_rows: int) -> None:
        self.path, self.dim = path, dim
        self.next_row = committed_rows  # uncommitted rows of a killed writer are overwritten
        flags = os.O_RDWR | os.O_CREAT
        try:
            self._fd = open_regular(path, flags)
        except OSError as exc:
            raise damaged(path, f"not a regular file: {exc}") from exc
        size = os.fstat(self._fd).st_size
        row_bytes = dim * DTYPE.itemsize
        if size < committed_rows * row_bytes:
            os.close(self._fd)
            raise damaged(path, f"{size} bytes, but the catalog has {committed_rows} rows")
        if size > committed_rows * row_bytes:
            os.ftruncate(self._fd, committed_rows * row_bytes)

    def append(self, features: npt.NDArray[np.floating]) -> int:
        """Write (n, d) rows after the last ones; returns the first one's row. Durable after
        the next sync (the writer syncs before its catalog commit)."""
        data = np.ascontiguousarray(features, DTYPE)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"rows of shape {data.shape}, expected (n, {self.dim})")
        first = self.next_row
        os.pwrite(self._fd, data.tobytes(), first * self.dim * DTYPE.itemsize)
        self.next_row += len(data)
        return first

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def write_matrix(path: Path, blocks: Iterator[np.ndarray], dim: int) -> int:
    """Write a whole new matrix file from (b, d) blocks, atomically; returns its rows. The
    caller points the catalog at it (then it is in use) and deletes the old one."""
    written = 0

    def write(f: IO[bytes]) -> None:
        nonlocal written
        for block in blocks:
            data = np.ascontiguousarray(block, DTYPE).reshape(-1, dim)
            f.write(data.tobytes())
            written += len(data)

    write_atomic(path, write)
    return written
