"""The database on disk (format 7). Only this package writes it.

    DB_DIR/cbir-db.json          manifest: format, backbone, weights, settings (manifest.py)
    DB_DIR/catalog.sqlite        images, their categories and matrix rows, source paths, the
                                 feature sums and the query head (cbir.centring): the commit
                                 point of every write (catalog.py)
    DB_DIR/matrix-<gen>.f16      every image's feature once, float16 rows (matrix.py)
    DB_DIR/<wnid>_<name>/        one folder per category: stored copies of its images and
        <stem>-<hash><ext>       features.<lo>-<hi>.npz segments (category_files.py)
    DB_DIR/.lock, .writing       the writer's lock; the marker of a write in progress

Reading: `Database.open` (database.py). Writing: `open_writer` (writer.py). Verifying and
repairing: `check_database` (check.py).
"""

from cbir.db.catalog import CATALOG_NAME, ImageRecord, PathRecord
from cbir.db.check import check_database
from cbir.db.database import Database
from cbir.db.manifest import FORMAT_VERSION, LINK_MODES, MANIFEST_NAME, Settings, read_manifest
from cbir.db.writer import NewImage, Writer, check_compatible, open_writer, stored_name

__all__ = [
    "CATALOG_NAME", "FORMAT_VERSION", "LINK_MODES", "MANIFEST_NAME", "Database", "ImageRecord",
    "NewImage", "PathRecord", "Settings", "Writer", "check_compatible", "check_database",
    "open_writer", "read_manifest", "stored_name",
]  # fmt: skip
