"""Run `cbir` and SIGKILL it at a chosen point of its writes: the crash-safety tests' subject.

    python tests/crash_runner.py POINT N cbir-arguments...

POINT is where the process kills itself on the N-th time it gets there:
  copy        after half of an image copy into a category folder was written
  matrix      after half of a commit's rows were appended to the search matrix
  features    after half of a category's new segment was written to its temporary file
  merge       after half of a merge of a category's segments was written (streamed rewrite)
  catalog     with a commit's rows written into the catalog's transaction, before COMMIT
              (the commit point; SQLite makes the commit itself atomic)
  manifest    just before the manifest is written (the catalog is already committed)
  lists       with a new generation of the inverted file written, before the catalog uses it
              (lists trained from 8 images, new rows covered past 2, so 37 photos train
              them once and cover new rows several times)
Nothing here is part of cbir: the kill is patched in from outside, as a power cut would be.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbir.cli import main  # noqa: E402
from cbir.db import catalog, category_files, ivf, matrix, writer  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, nth: int) -> None:
    category_files.MERGE_FANOUT, category_files.CLASS_BYTES = 2, 256  # 37 photos merge often
    calls = 0

    def due() -> bool:
        nonlocal calls
        calls += 1
        return calls == nth

    if point == "copy":
        real_copy = writer.shutil.copyfile

        def copyfile(src: str, dst: str) -> str:
            if due():
                data = Path(src).read_bytes()
                Path(dst).write_bytes(data[: len(data) // 2])
                die()
            return real_copy(src, dst)

        writer.shutil.copyfile = copyfile
        return

    if point == "lists":
        ivf.IVF_MIN_IMAGES, ivf.NEW_ROWS_MIN = 8, 2
        real_write_lists = ivf.InvertedFile.write

        def write_lists(self, path: Path) -> None:  # noqa: ANN001
            real_write_lists(self, path)
            if due():
                die()

        ivf.InvertedFile.write = write_lists
        return

    if point == "manifest":
        real_write = writer.write_manifest

        def write_manifest(db_dir: Path, manifest) -> None:  # noqa: ANN001
            if due():
                die()
            real_write(db_dir, manifest)

        writer.write_manifest = write_manifest
        return

    if point == "matrix":
        real_append = matrix.MatrixAppender.append

        def append(self, features):  # noqa: ANN001, ANN202
            if due():
                half = features[: max(1, len(features) // 2)]
                real_append(self, half)
                os.fsync(self._fd)
                die()
            return real_append(self, features)

        matrix.MatrixAppender.append = append
        return

    def half_then_die(write):  # noqa: ANN001, ANN202
        def write_half_then_die(f) -> None:  # noqa: ANN001
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()

        return write_half_then_die

    if point == "catalog":
        real_transaction = catalog.Catalog.transaction

        @contextlib.contextmanager
        def transaction(self):  # noqa: ANN001, ANN202
            with real_transaction(self) as conn:
                before = conn.total_changes
                yield conn
                if conn.total_changes > before and due():
                    die()

        catalog.Catalog.transaction = transaction
        return

    if point == "merge":
        real_merging_writer = writer.merging_writer

        def merging_writer(*args):  # noqa: ANN002, ANN202
            write = real_merging_writer(*args)
            return half_then_die(write) if due() else write

        writer.merging_writer = merging_writer
        return

    real_segment_writer = category_files.CategoryRows.writer

    def segment_writer(self):  # noqa: ANN001, ANN202
        write = real_segment_writer(self)
        return half_then_die(write) if due() else write

    category_files.CategoryRows.writer = segment_writer


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
