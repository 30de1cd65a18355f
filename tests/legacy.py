"""Databases as older cbir versions wrote them, made from a current one: format 1 kept each
category's rows in one features.npz, and formats 1 and 2 kept the catalog in catalog.npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cbir.store import (
    CATALOG_NAME,
    FEATURES_NAME,
    LEGACY_CATALOG_NAME,
    MANIFEST_NAME,
    Database,
    read_category_folder,
)  # fmt: skip


def to_format_1(db: Path) -> None:
    database = Database.open(db)
    catalog, dim = database.catalog, database.settings.feature_dim
    for folder in db.glob("n*_*"):
        rows = read_category_folder(folder, dim)
        for segment in folder.glob("features.*.npz"):
            segment.unlink()
        np.savez_compressed(folder / FEATURES_NAME, ids=rows.ids, paths=rows.paths,
                            files=rows.files, features=rows.features)  # fmt: skip
    images, paths = catalog.images, catalog.paths
    np.savez_compressed(
        db / LEGACY_CATALOG_NAME,
        ids=images.ids,
        sha256=images.sha256.astype("U64"),
        stored_names=images.stored_names.astype(np.str_),
        wnids=images.wnids,
        probs=images.probs,
        path_strings=paths.strings.astype(np.str_),
        path_ids=paths.ids,
        path_sizes=paths.sizes,
        path_mtimes=paths.mtimes,
    )
    (db / CATALOG_NAME).unlink()
    manifest = json.loads((db / MANIFEST_NAME).read_text())
    (db / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 1}))
