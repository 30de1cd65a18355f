"""A damaged database gives a clear error naming the file, and `cbir check --repair` mends it:
the search matrix from the category files, a category file from the matrix, a stored copy
from another copy, the catalog from the category files and copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cbir.cli import main
from cbir.db import CATALOG_NAME, MANIFEST_NAME, Database
from tests.conftest import TESTDATA, needs_shared

pytestmark = needs_shared
CHELSEA = TESTDATA / "photos" / "animals" / "chelsea.jpg"


@pytest.fixture
def db(photos_db: Path, tmp_path: Path) -> Path:
    """A private copy of the session's photos database, free to damage."""
    target = tmp_path / "db"
    shutil.copytree(photos_db, target)
    return target


def chelsea_category(db: Path) -> Path:
    """The category folder of chelsea's top class (every query for chelsea opens it)."""
    [rec] = [r for r in Database.open(db).images() if r.stored_name.startswith("chelsea-")]
    return next(db.glob(f"{rec.wnids[0]}_*"))


def query_fails_naming(db: Path, capsys, fragment: str) -> None:
    assert main(["query", str(db), str(CHELSEA), "--all"]) == 1
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err


def results(db: Path, capsys, *options: str) -> list[tuple[str, float]]:
    capsys.readouterr()
    assert main(["query", str(db), str(CHELSEA), "--json", "-n", "37", *options]) == 0
    return [(r["path"], r["score"]) for r in json.loads(capsys.readouterr().out)["results"]]


def test_truncated_category_file_is_named_by_check_then_rebuilt_from_the_matrix(db, capsys):
    before = results(db, capsys)
    features = next(chelsea_category(db).glob("features.*.npz"))
    features.write_bytes(features.read_bytes()[:100])
    assert results(db, capsys) == before  # queries read the search matrix, not this file
    assert main(["check", str(db)]) == 1
    assert f"{features} is damaged" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0
    assert main(["check", str(db)]) == 0
    assert results(db, capsys) == before


def test_deleted_category_file_is_restored_from_the_matrix(db, capsys):
    folder = chelsea_category(db)
    for features in folder.glob("features.*.npz"):
        features.unlink()
    assert main(["check", str(db)]) == 1
    assert f"{folder} has no features file" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0
    assert list(folder.glob("features.*.npz")) and main(["check", str(db)]) == 0


def test_deleted_search_matrix_is_named_then_rebuilt_from_the_category_files(db, capsys):
    before = results(db, capsys, "--all")
    [matrix] = db.glob("matrix-*.f16")
    matrix.unlink()
    query_fails_naming(db, capsys, f"{matrix} is missing; run 'cbir check --repair'")
    assert main(["check", str(db), "--repair"]) == 0
    assert "rebuilt from the category files" in capsys.readouterr().out
    assert main(["check", str(db)]) == 0
    assert results(db, capsys, "--all") == before


def test_damaged_catalog_is_rebuilt_and_a_rerun_reattaches_the_source_paths(db, photos_dir,
                                                                            capsys):  # fmt: skip
    before = results(db, capsys)
    (db / CATALOG_NAME).write_bytes(b"garbage")
    query_fails_naming(db, capsys, f"{db / CATALOG_NAME} is damaged")
    assert main(["check", str(db), "--repair"]) == 0
    assert "source paths and the query head are lost" in capsys.readouterr().out
    assert Database.open(db).n_images() == 37
    assert main(["check", str(db)]) == 0
    capsys.readouterr()
    assert [score for _, score in results(db, capsys)] == [score for _, score in before]
    assert main(["create-db", str(photos_dir), str(db)]) == 0
    assert "known content under a new name 37" in capsys.readouterr().err
    assert results(db, capsys) == before


def test_missing_stored_copy_is_copied_again(db, capsys):
    copy = next(chelsea_category(db).glob("chelsea-*.jpg"))
    copy.unlink()
    assert main(["check", str(db)]) == 1
    assert f"{copy} is missing" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0
    assert copy.read_bytes() == CHELSEA.read_bytes()


def test_manifest_from_a_newer_cbir_is_refused(db, capsys):
    manifest = json.loads((db / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (db / MANIFEST_NAME).write_text(json.dumps(manifest))
    query_fails_naming(db, capsys, "format 99, newer than this cbir understands")
    assert main(["info", str(db)]) == 1


def test_healthy_database_checks_ok(photos_db, capsys):
    assert main(["check", str(photos_db)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_placements_pointing_at_other_rows_are_named_then_given_their_images_rows(db, capsys):
    import sqlite3

    before = results(db, capsys)
    with sqlite3.connect(db / CATALOG_NAME) as conn:  # every placement one row off
        conn.execute("UPDATE placements SET row = row + 1000")
    conn.close()
    assert main(["check", str(db)]) == 1
    assert "37 images" not in (out := capsys.readouterr().out) and "placements that disagree" in out
    assert main(["check", str(db), "--repair"]) == 0
    assert main(["check", str(db)]) == 0
    assert results(db, capsys) == before
