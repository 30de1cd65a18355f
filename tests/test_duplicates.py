"""`cbir duplicates` on real photos: near-duplicate variants grouped with their originals,
identical files grouped, distinct photos left alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cbir.cli import main
from tests.conftest import TESTDATA, needs_shared, photos_with_variants
from tests.test_cli import run_cli, run_json

pytestmark = needs_shared
STEMS = ("chelsea", "rocket")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 37 photos, the 16 variants of two of them, and one photo copied under a new name."""
    root = tmp_path_factory.mktemp("duplicates")
    source = photos_with_variants(root, STEMS)
    shutil.copy(TESTDATA / "photos" / "food" / "coffee.jpg", source / "coffee (copy).jpg")
    db = root / "db"
    assert main(["create-db", str(source), str(db), "--model", "efficientnet_lite0"]) == 0
    return db


def test_variants_are_grouped_with_their_originals_and_nothing_else(db: Path, capsys) -> None:
    groups = run_json(capsys, "duplicates", str(db), "--json")
    by_name = {frozenset(Path(p).name for p in g["paths"]): g["score"] for g in groups}
    expected = {frozenset({f"{stem}.jpg", *(f"{stem}__{v}.jpg" for v in (
        "blur", "bright130", "crop90", "grey", "half", "hflip", "q30", "rot5"))})
        for stem in STEMS}  # fmt: skip
    expected.add(frozenset({"coffee.jpg", "coffee (copy).jpg"}))
    assert set(by_name) == expected  # the other 35 photos are in no group
    assert by_name[frozenset({"coffee.jpg", "coffee (copy).jpg"})] == 1.0  # identical content
    for names, score in by_name.items():
        assert 0.8 <= score <= 1.0, names
    assert [g["score"] for g in groups] == sorted(g["score"] for g in groups)


def test_a_higher_threshold_splits_off_the_weaker_variants(db: Path, capsys) -> None:
    default = run_json(capsys, "duplicates", str(db), "--json")
    strict = run_json(capsys, "duplicates", str(db), "--json", "--threshold", "0.97")
    grouped = {Path(p).name for g in strict for p in g["paths"]}
    assert "coffee (copy).jpg" in grouped  # identical content always groups
    assert len(grouped) < 2 + 2 * 9
    for group in strict:  # each strict group lies inside one of the default's
        assert any(set(group["paths"]) <= set(g["paths"]) for g in default)


def test_text_output_and_bad_thresholds(db: Path) -> None:
    done = run_cli("duplicates", str(db))
    assert done.returncode == 0
    assert "2 files, identical:" in done.stdout and "9 files, lowest cosine" in done.stdout
    assert done.stderr.strip() == "3 group(s) of duplicates (threshold 0.8)"
    bad = run_cli("duplicates", str(db), "--threshold", "2")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "between -1 and 1" in bad.stderr
    assert json.loads(run_cli("duplicates", str(db), "--json").stdout.splitlines()[0])["paths"]


def test_a_pair_counts_when_found_from_either_side() -> None:
    """Row 40 is near all of a tight cluster of 40: each of those has 32 nearer neighbours,
    so only row 40's own search (its 32 nearest) finds its pairs, and they must count."""
    import numpy as np

    from cbir.duplicates import NEIGHBOURS, similar_pairs
    from cbir.ranking import Float16Rows

    rng = np.random.default_rng(0)
    centre = rng.normal(size=64)
    centre /= np.linalg.norm(centre)
    rows = centre + 0.01 * rng.normal(size=(40, 64))
    outsider = centre + 0.12 * rng.normal(size=64)  # cosine about 0.7 to each of them
    features = np.vstack([rows, outsider, rng.normal(size=(20, 64))])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    codes = Float16Rows(64)
    codes.buffer(len(features))[:] = features.astype("<f2").view(np.uint8)
    threshold = float(np.sort(features[:40] @ features[40])[0]) - 0.01  # float16 rounding
    first, second, _ = similar_pairs(codes, threshold)
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    assert len({i for i, j in pairs if j == 40}) == NEIGHBOURS  # all that row 40 found
    assert len(pairs) == len(first)  # each pair once
