"""The README's walkthrough, run through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.db import MANIFEST_NAME, Database
from tests.conftest import TESTDATA, needs_shared

REPO = Path(__file__).resolve().parent.parent
pytestmark = needs_shared


def run_json(capsys, *args: str) -> list[dict]:
    assert main(list(args)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_near_duplicate_finds_its_original_at_rank_one(photos_db, capsys):
    variants = sorted((TESTDATA / "near_duplicates").glob("*__*.jpg"))
    assert len(variants) == 64
    results = run_json(capsys, "query", str(photos_db), *map(str, variants), "-n", "3", "--json")
    misses = []
    for variant, result in zip(variants, results, strict=True):
        original = variant.stem.split("__")[0]
        if Path(result["results"][0]["path"]).stem != original:
            misses.append(variant.name)
    assert misses == []


def test_query_reports_each_image_once_by_source_path(photos_db, photos_dir, capsys):
    query = photos_dir / "animals" / "chelsea.jpg"
    [result] = run_json(capsys, "query", str(photos_db), str(query), "--json", "-n", "50")
    paths = [r["path"] for r in result["results"]]
    assert len(paths) == len(set(paths))
    assert paths[0] == str(query) and result["results"][0]["score"] > 0.999
    assert len(result["categories"]) == 4
    assert {"id", "name", "prob"} <= set(result["categories"][0])
    assert result["searched"] >= len(paths)


def test_same_file_name_in_two_folders_is_stored_twice(photos_db, photos_dir):
    stored = [p.name for p in photos_db.rglob("IMG_0001-*.jpg")]
    assert len(set(stored)) == 2
    paths = [p for p, _ in Database.open(photos_db).paths()]
    names = {Path(p).parent.name for p in paths if p.endswith("IMG_0001.jpg")}
    assert names == {"animals", "landscapes"}


def test_database_files_are_plain_arrays_and_each_image_is_in_top_k_folders(photos_db):
    manifest = json.loads((photos_db / MANIFEST_NAME).read_text())
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["n_images"] == 37
    assert manifest["format_version"] == 7
    rows = 0
    for npz_path in photos_db.glob("n*/features.*.npz"):
        with np.load(npz_path, allow_pickle=False) as npz:
            assert sorted(npz.files) == ["features", "files", "ids", "probs"]  # no paths
            features = npz["features"]
            assert features.dtype == np.float16 and features.shape[1] == 1280
            np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=2e-3)
            assert all((npz_path.parent / f).is_file() for f in npz["files"])
            rows += len(features)
    assert rows == 37 * 4
    # The search matrix holds every image's feature once, float16 rows without a header.
    [matrix] = photos_db.glob("matrix-*.f16")
    assert matrix.stat().st_size == 37 * 1280 * 2


def test_info_lists_model_counts_and_categories(photos_db, capsys):
    [info] = run_json(capsys, "info", str(photos_db), "--json")
    assert info["backbone"] == "efficientnet_lite0" and info["images"] == 37
    sizes = [c["images"] for c in info["categories"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 37 * 4


def test_plot_is_saved_as_an_image(photos_db, tmp_path, capsys):
    out = tmp_path / "results.png"
    queries = [
        TESTDATA / "near_duplicates" / "rocket__crop90.jpg",
        TESTDATA / "formats" / "cmyk.jpg",
    ]
    assert main(["query", str(photos_db), *map(str, queries), "--plot", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert "rocket.jpg" in capsys.readouterr().out


def test_query_with_another_backbone_is_refused_naming_both(photos_db, capsys):
    query = str(TESTDATA / "photos" / "animals" / "chelsea.jpg")
    assert main(["query", str(photos_db), query, "--model", "resnet50", "--weights", "none"]) == 1
    err = capsys.readouterr().err
    assert "efficientnet_lite0" in err and "resnet50" in err and err.count("\n") == 1


def test_adding_with_another_backbone_is_refused(photos_db, capsys):
    extra = str(TESTDATA / "formats" / "baseline.jpg")
    assert main(["add", str(photos_db), extra, "--model", "resnet50", "--weights", "none"]) == 1
    assert "cannot be compared" in capsys.readouterr().err


def test_fallback_when_no_predicted_category_is_in_the_database(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "rocket.jpg").write_bytes((TESTDATA / "photos/vehicles/rocket.jpg").read_bytes())
    db = tmp_path / "db"
    assert (
        main(["create-db", str(src), str(db), "--model", "efficientnet_lite0", "--top-k", "1"]) == 0
    )
    capsys.readouterr()
    cat = TESTDATA / "photos" / "animals" / "chelsea.jpg"
    assert main(["query", str(db), str(cat), "--min-candidates", "0"]) == 0
    out = capsys.readouterr().out
    assert "none of its predicted categories is in the database" in out
    assert "rocket.jpg" in out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "/nonexistent/db", "x.jpg"], "does not exist"),
        (["info", "/nonexistent/db"], "no database at /nonexistent/db"),
        (["create-db", "/nonexistent/src", "/tmp/never"], "source folder /nonexistent/src"),
        (["query", "/tmp", "x.jpg", "--min-score", "nan"], "'nan' is not a finite number"),
        (["query", "/tmp", "x.jpg", "--max-megapixels", "nan"], "'nan' is not a finite number"),
        (["serve", "/tmp", "--max-upload-mb", "inf"], "'inf' is not a finite number"),
    ],
)
def test_user_mistakes_are_one_line_on_stderr_and_a_nonzero_exit(args, message):
    done = run_cli(*args)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_query_image_that_is_not_an_image_fails_cleanly(photos_db):
    done = run_cli("query", str(photos_db), str(TESTDATA / "bad" / "not_an_image.jpg"))
    assert done.returncode == 1 and "not an image" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_and_help_never_import_tensorflow(photos_db):
    code = ("import sys; from cbir.cli import main; main(['info', sys.argv[1]]);"
            "assert not {'tensorflow', 'openvino', 'keras'} & set(sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(photos_db)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run_cli("--help")
    assert done.returncode == 0 and "create-db" in done.stdout


def test_queries_in_one_batch_rank_as_each_alone(photos_db, capsys):
    """A batch gathers its categories' rows once (cbir.query.CandidatePool): same answers."""
    images = [str(p) for p in sorted((TESTDATA / "photos").rglob("*.jpg"))[::5]]
    options = ["--json", "-n", "8", "--min-candidates", "4"]  # gated: a few categories each
    together = run_json(capsys, "query", str(photos_db), *images, *options)
    alone = [run_json(capsys, "query", str(photos_db), image, *options)[0] for image in images]
    assert [r["results"] for r in together] == [r["results"] for r in alone]
    assert len({tuple(r["searched_categories"]) for r in together}) > 1  # different rows
    assert max(r["searched"] for r in together) < 37  # each only its own categories
