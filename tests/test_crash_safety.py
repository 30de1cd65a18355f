"""A real `cbir create-db` killed with SIGKILL at many points, then run again, gives the same
database as an uninterrupted run; in between, the database opens and answers queries."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.db import Database
from cbir.db.category_files import read_folder, segments
from tests.conftest import needs_shared

pytestmark = needs_shared
REPO = Path(__file__).resolve().parent.parent
OPTIONS = [
    "--model",
    "efficientnet_lite0",
    "--precision",
    "fp32",
    "--batch-size",
    "8",
    "--commit-every",
    "1",
]  # fmt: skip  (37 photos -> 5 commits of a batch each; category files written 3 times)


def db_state(db_dir: Path) -> tuple[dict, dict]:
    """(everything but features, features by image and by category) of a database, as readers
    see it: the catalog, the stored files, each category file's committed rows, and the search
    matrix's row of every image."""
    with Database.open(db_dir) as db:
        state: dict = {
            "images": {r.image_id: (r.sha256, r.stored_name, r.wnids) for r in db.images()},
            "paths": {p: r.image_id for p, r in db.paths()},
            "files": sorted(  # feature files are compared by their rows below
                str(p.relative_to(db_dir)) for p in db_dir.glob("*/*") if p.suffix != ".npz"
            ),
            "manifest_images": db.manifest.n_images,
            "matrix_rows": db.matrix().n_rows,  # a killed commit's rows are overwritten
        }
        features = {}
        for folder in sorted(db_dir.glob("n*_*")):
            rows = read_folder(folder, db.settings.feature_dim)
            keep = np.isin(rows.ids, db.members(folder.name.split("_")[0]))
            order = np.argsort(rows.ids[keep])
            state[folder.name] = (rows.ids[keep][order].tolist(), rows.files[keep][order].tolist())
            features[folder.name] = rows.features[keep][order].astype(np.float32)
        records = sorted(db.images(), key=lambda r: r.image_id)
        features["matrix"] = db.matrix().gather(np.array([r.row for r in records], np.int64))
    return state, features


@pytest.fixture(scope="module")
def reference(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    db = tmp_path_factory.mktemp("reference") / "db"
    assert main(["create-db", str(photos_dir), str(db), *OPTIONS]) == 0
    return db_state(db)


def run_cbir(*args: str, kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    runner = [str(REPO / "tests" / "crash_runner.py"), *map(str, kill_at)] if kill_at else [
        str(REPO / "bin" / "cbir")]  # fmt: skip
    return subprocess.Popen([sys.executable, *runner, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.parametrize(
    "point, nth",
    [
        ("copy", 3),
        ("copy", 30),
        ("matrix", 1),
        ("matrix", 4),
        ("features", 1),
        ("features", 40),
        ("merge", 1),
        ("merge", 3),  # the last of the run's three (tests/crash_runner.py)
        ("catalog", 1),
        ("catalog", 3),
        ("manifest", 2),
        ("manifest", 5),
        ("lists", 1),  # the inverted file's training
        ("lists", 2),  # its first cover of new rows
    ],  # fmt: skip
)
def test_killed_run_leaves_a_working_database_that_a_rerun_completes(
    point, nth, photos_dir, reference, tmp_path, capsys
):
    db = tmp_path / "db"
    killed = run_cbir("create-db", str(photos_dir), str(db), *OPTIONS, kill_at=(point, nth))
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err

    # In between: the database opens, and a query answers from what was committed.
    committed = Database.open(db).n_images()
    # Category files are written after their images' commits (every 16 commits and at the
    # end of a run): a kill while writing or merging them can come after the last commit.
    assert committed < 37 or point in ("features", "merge", "lists")
    chelsea = photos_dir / "animals" / "chelsea.jpg"
    assert main(["query", str(db), str(chelsea), "--json", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == min(10, committed)

    assert main(["create-db", str(photos_dir), str(db), *OPTIONS]) == 0
    assert f"unchanged {committed}" in capsys.readouterr().err
    state, features = db_state(db)
    expected_state, expected_features = reference
    assert state == expected_state
    for name, rows in features.items():
        np.testing.assert_allclose(rows, expected_features[name], atol=1e-4)
    assert not list(db.rglob(".tmp-*")) and not (db / ".writing").exists()
    assert not [stale for folder in db.glob("n*_*") for stale in segments(folder)[1]]
    assert main(["check", str(db)]) == 0


def test_two_concurrent_adds_lose_nothing(photos_dir, reference, tmp_path):
    db = tmp_path / "db"
    first_half = tmp_path / "a"
    second_half = tmp_path / "b"
    for folder in sorted(photos_dir.iterdir()):
        target = first_half if folder.name < "m" else second_half
        shutil.copytree(folder, target / folder.name)
    assert main(["create-db", str(first_half / "animals"), str(db), *OPTIONS]) == 0
    a = run_cbir("add", str(db), str(first_half), *OPTIONS)
    time.sleep(0.2)
    b = run_cbir("add", str(db), str(second_half), *OPTIONS)
    (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert (a.returncode, b.returncode) == (0, 0), err_a + err_b
    with Database.open(db) as database:
        paths = [p for p, _ in database.paths()]
        assert database.n_images() == 37
    assert {folder_and_name(p) for p in paths} == {
        folder_and_name(p) for p in reference[0]["paths"]
    }


def folder_and_name(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def test_second_writer_waits_with_a_message_or_fails_clearly_with_no_wait(photos_db):
    from cbir.db import open_writer

    with open_writer(photos_db):
        refused = run_cbir("sync", str(photos_db), "--no-wait")
        refused.wait(timeout=60)
        waiting = run_cbir("sync", str(photos_db))
        time.sleep(3)
        assert waiting.poll() is None, "the second writer did not wait"
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "waiting for it to finish" in err
    refused_err = refused.stderr.read()
    assert refused.returncode == 1, refused_err
    assert "another cbir process is writing" in refused_err and "Traceback" not in refused_err
