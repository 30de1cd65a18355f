"""Shared test set-up: where the real data lives, and an environment that never downloads.

Every test session gets its own cache and Keras home (empty: nothing can be found there, and
CBIR_OFFLINE forbids downloads), so tests never touch the user's files or the network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
TESTDATA = SHARED / "testdata"
EVALDATA = SHARED / "evaldata"

needs_shared = pytest.mark.skipif(
    not TESTDATA.is_dir(),
    reason=f"real test data not found at {SHARED} (../shared beside the repo)",
)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("env")
    os.environ["CBIR_CACHE_DIR"] = str(home / "cache")
    os.environ["KERAS_HOME"] = str(home / "keras")
    os.environ["CBIR_OFFLINE"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of shared/testdata/photos (37 real photos in 7 folders)."""
    if not TESTDATA.is_dir():
        pytest.skip(f"real test data not found at {TESTDATA}")
    target = tmp_path_factory.mktemp("src") / "photos"
    shutil.copytree(TESTDATA / "photos", target)
    return target


@pytest.fixture(scope="session")
def photos_db(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """A database of photos/ built once per session with the embedded efficientnet_lite0."""
    from cbir.cli import main

    db = tmp_path_factory.mktemp("db") / "photos_db"
    assert main(["create-db", str(photos_dir), str(db), "--model", "efficientnet_lite0"]) == 0
    return db


@pytest.fixture(scope="session")
def lite0():
    """The embedded EfficientNet-Lite0 with real ImageNet weights, loaded once per session."""
    from cbir.model import load_model

    return load_model("efficientnet_lite0")


def photos_with_variants(root: Path, stems: tuple[str, ...]) -> Path:
    """A source folder under `root`: the 37 photos, and the 8 near-duplicate variants of each
    photo named in `stems` (in variants/)."""
    source = root / "src"
    shutil.copytree(TESTDATA / "photos", source / "photos")
    (source / "variants").mkdir()
    for stem in stems:
        for variant in (TESTDATA / "near_duplicates").glob(f"{stem}__*.jpg"):
            shutil.copy(variant, source / "variants" / variant.name)
    return source
