"""`cbir map`: the feature space in 2-D, where near-duplicates land beside their originals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.cli import main
from cbir.db import Database
from cbir.projection import project, spread_sample
from tests.conftest import needs_shared, photos_with_variants
from tests.test_cli import run_cli

pytestmark = needs_shared
STEMS = ("chelsea", "coffee", "china")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("map")
    source = photos_with_variants(root, STEMS)
    assert main(["create-db", str(source), str(root / "db"), "--model", "efficientnet_lite0"]) == 0
    return root / "db"


def stem_of(path: str) -> str:
    return Path(path).stem.split("__")[0]


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_near_duplicates_land_beside_their_originals(db: Path, method: str) -> None:
    with Database.open(db) as opened:
        projection = project(opened, method)
        stems = [stem_of(opened.paths_of(i)[0]) for i in projection.ids.tolist()]
    assert projection.points.shape == (37 + 8 * len(STEMS), 2) and projection.method == method
    distances = np.linalg.norm(projection.points[:, None] - projection.points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    ours = [i for i, s in enumerate(stems) if s in STEMS]
    beside = [stems[int(np.argmin(distances[i]))] == stems[i] for i in ours]
    assert np.mean(beside) >= 0.9  # each one's nearest point on the map is its own photo's


def test_spread_sample_covers_the_map() -> None:
    points = np.random.default_rng(0).random((1000, 2)).astype(np.float32)
    chosen = spread_sample(points, 16)
    assert len(chosen) == 16 and len(set(chosen)) == 16
    cells = {(int(x * 4), int(y * 4)) for x, y in points[chosen]}
    assert len(cells) == 16  # one per cell of a 4 x 4 grid


def test_cbir_map_saves_a_figure(db: Path, tmp_path: Path) -> None:
    done = run_cli("map", str(db), "--plot", str(tmp_path / "map"), "--colour", "folder",
                   "--thumbnails", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"saved map {tmp_path / 'map.png'} ({37 + 24} images, t-SNE)"
    with Image.open(tmp_path / "map.png") as im:
        assert im.size == (1200, 1000)
    bad = run_cli("map", str(db), "--plot", str(tmp_path / "x.docx"))
    assert bad.returncode == 1 and "cannot save a figure" in bad.stderr
