"""Incremental indexing: add, the same photo twice, changed files, remove, sync, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.db import Database
from cbir.db.category_files import merge_tail, read_folder, segments
from cbir.errors import DatabaseError
from cbir.images import load_image
from cbir.indexing import IndexOptions, index_paths
from tests.conftest import TESTDATA, needs_shared

pytestmark = needs_shared
LITE0 = ["--model", "efficientnet_lite0"]


def copy_photos(target: Path, *names: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(TESTDATA / "photos" / name, target / Path(name).name)
    return target


def committed_rows(db: Database, folder: Path):  # noqa: ANN201
    """A category folder's committed rows, sorted by id."""
    rows = read_folder(folder, db.settings.feature_dim)
    rows = rows.select(np.isin(rows.ids, db.members(folder.name.split("_")[0])))
    return rows.select(np.argsort(rows.ids))


def db_state(db_dir: Path) -> dict:
    """Everything a database says about its images: catalog, category rows and stored files."""
    db = Database.open(db_dir)
    state = {
        "images": {r.image_id: (r.sha256, r.wnids) for r in db.images()},
        "paths": {p: r.image_id for p, r in db.paths()},
        "files": sorted(
            str(p.relative_to(db_dir))
            for p in db_dir.rglob("*")
            if p.is_file() and p.parent != db_dir
        ),
    }
    for folder in sorted(db_dir.glob("n*_*")):
        rows = committed_rows(db, folder)
        state[folder.name] = (rows.ids.tolist(), rows.files.tolist(),
                              np.round(rows.features.astype(np.float32), 3).tolist())  # fmt: skip
    return state


def catalog_paths(db_dir: Path) -> list[str]:
    return [p for p, _ in Database.open(db_dir).paths()]


def query_paths(db_dir: Path, image: Path, capsys) -> list[str]:
    assert main(["query", str(db_dir), str(image), "--json", "-n", "50"]) == 0
    return [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]


def test_an_image_is_copied_once_and_its_other_categories_link_to_that_copy(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    copies = sorted(db.glob("n*_*/chelsea-*.jpg"))
    assert len(copies) == 4
    assert len({(c.stat().st_dev, c.stat().st_ino) for c in copies}) == 1
    (src / "chelsea.jpg").write_bytes(b"changed after indexing")
    assert copies[0].read_bytes() == (TESTDATA / "photos/animals/chelsea.jpg").read_bytes()
    assert main(["info", str(db), "--json"]) == 0
    disk = json.loads(capsys.readouterr().out)["disk_bytes"]
    assert disk < sum(f.stat().st_size for f in db.rglob("*") if f.is_file())


def test_a_database_keeps_the_resize_filter_it_was_built_with(tmp_path, capsys, lite0):
    """Adds and queries resize with the filter the manifest records (bicubic here)."""
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    more = copy_photos(tmp_path / "more", "food/coffee.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    manifest = json.loads((db / "cbir-db.json").read_text())
    assert manifest["resize"] == "bilinear"
    (db / "cbir-db.json").write_text(json.dumps({**manifest, "resize": "bicubic"}))
    assert main(["add", str(db), str(more), *LITE0]) == 0
    assert main(["info", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resize"] == "bicubic"

    coffee = more / "coffee.jpg"
    bilinear, bicubic = lite0.describe(
        np.stack([load_image(coffee, 224, resize=f) for f in ("bilinear", "bicubic")])
    ).features["gap"]
    assert float(bilinear @ bicubic) < 0.999  # the filters give measurably different features
    database = Database.open(db)
    record = database.image(database.catalog.path_record(str(coffee)).image_id)
    stored = database.matrix().gather(np.array([record.row]))[0]
    assert float(stored @ bicubic) > float(stored @ bilinear)
    assert main(["query", str(db), str(coffee), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["score"] > 0.9999


def test_adding_twice_adds_nothing_the_second_time(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg", "food/coffee.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    before = db_state(db)
    assert main(["add", str(db), str(src), *LITE0]) == 0
    assert "indexed 0, unchanged 2, skipped 0" in capsys.readouterr().err
    assert db_state(db) == before


def test_add_indexes_only_the_new_files_and_touches_only_their_categories(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg", "food/coffee.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in db.glob("n*/features.*.npz")}
    assert len(mtimes) >= 4
    new = copy_photos(tmp_path / "more", "vehicles/rocket.jpg")
    capsys.readouterr()
    assert main(["add", str(db), str(new / "rocket.jpg"), *LITE0]) == 0
    assert "indexed 1, unchanged 0, skipped 0" in capsys.readouterr().err
    database = Database.open(db)
    rocket = database.image(database.catalog.path_record(str(new / "rocket.jpg")).image_id)
    rocket_categories = set(rocket.wnids)
    for path, mtime in mtimes.items():
        if path.parent.name.split("_")[0] not in rocket_categories:
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"


def test_same_photo_under_two_names_is_one_image_with_two_paths(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    shutil.copy(src / "chelsea.jpg", src / "chelsea copy.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    assert "indexed 1, unchanged 0, skipped 0, known content under a new name 1" in (
        capsys.readouterr().err
    )
    assert Database.open(db).n_images() == 1
    assert sorted(Path(p).name for p in catalog_paths(db)) == ["chelsea copy.jpg", "chelsea.jpg"]
    assert len(list(db.rglob("chelsea*.jpg"))) == 4  # one copy in each of its 4 categories


def test_copies_of_a_photo_met_across_commits_are_one_image_each(tmp_path, capsys):
    """Within a run, content is recognised whether its first copy is being collected, being
    committed or committed already: with batches and commits of 1 image, all three happen."""
    names = ["animals/chelsea.jpg", "landscapes/IMG_0001.jpg", "vehicles/rocket.jpg"]
    src = tmp_path / "src"
    for copy in range(4):  # a/, b/, c/, d/: walked in order, each holds all three photos
        copy_photos(src / "abcd"[copy], *names)
    db = tmp_path / "db"
    one_at_a_time = ["--batch-size", "1", "--commit-every", "1"]
    assert main(["create-db", str(src), str(db), *LITE0, *one_at_a_time]) == 0
    assert "indexed 3, unchanged 0, skipped 0, known content under a new name 9" in (
        capsys.readouterr().err
    )
    assert Database.open(db).n_images() == 3 and len(catalog_paths(db)) == 12
    assert main(["check", str(db)]) == 0


def test_changed_file_is_reindexed_and_its_old_rows_and_copies_replaced(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg", "food/coffee.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    shutil.copy(TESTDATA / "photos" / "vehicles" / "rocket.jpg", src / "chelsea.jpg")
    os.utime(src / "chelsea.jpg", ns=(1, 1))
    capsys.readouterr()
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    assert "indexed 1, unchanged 1, skipped 0, removed 1" in capsys.readouterr().err
    assert Database.open(db).n_images() == 2
    stored = [p.read_bytes() for p in db.rglob("chelsea-*.jpg")]
    assert len(stored) == 4 and all(b == (src / "chelsea.jpg").read_bytes() for b in stored)
    rocket = TESTDATA / "photos" / "vehicles" / "rocket.jpg"
    assert query_paths(db, rocket, capsys)[0] == str(src / "chelsea.jpg")


def test_removed_image_is_gone_from_results_and_disk(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg", "food/coffee.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    assert main(["remove", str(db), str(src / "chelsea.jpg")]) == 0
    assert "removed 1" in capsys.readouterr().err
    assert not list(db.rglob("chelsea-*"))
    assert str(src / "chelsea.jpg") not in query_paths(db, src / "chelsea.jpg", capsys)
    assert Database.open(db).n_images() == 1


def test_a_removed_image_leaves_the_segments_it_shared(tmp_path, capsys):
    """A near-duplicate shares chelsea's categories and segments: removing chelsea rewrites
    them without its row and keeps the other's."""
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    shutil.copy(TESTDATA / "near_duplicates" / "chelsea__rot5.jpg", src)
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    database = Database.open(db)
    gone = database.catalog.path_record(str(src / "chelsea.jpg")).image_id
    kept = database.catalog.path_record(str(src / "chelsea__rot5.jpg")).image_id
    shared = [f for f in db.iterdir() if f.is_dir() and
              {gone, kept} <= set(read_folder(f, database.settings.feature_dim).ids.tolist())]
    assert shared  # the two share categories
    assert main(["remove", str(db), str(src / "chelsea.jpg")]) == 0
    for folder in shared:
        ids = read_folder(folder, database.settings.feature_dim).ids.tolist()
        assert ids == [kept]
        assert not list(folder.glob("chelsea-*"))
    capsys.readouterr()
    assert main(["check", str(db)]) == 0
    assert "problem" not in capsys.readouterr().out.lower()


def test_sync_and_prune_drop_images_whose_source_was_deleted(tmp_path, capsys):
    src = copy_photos(
        tmp_path / "src", "animals/chelsea.jpg", "food/coffee.jpg", "vehicles/rocket.jpg"
    )
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    (src / "chelsea.jpg").unlink()
    assert main(["sync", str(db)]) == 0
    assert "removed 1" in capsys.readouterr().err
    (src / "coffee.jpg").unlink()
    assert main(["create-db", str(src), str(db), *LITE0, "--prune"]) == 0
    assert "removed 1" in capsys.readouterr().err
    assert [Path(p).name for p in catalog_paths(db)] == ["rocket.jpg"]
    assert sorted(p.name.split("-")[0] for p in db.rglob("*.jpg")) == ["rocket"] * 4


def test_a_source_that_cannot_be_looked_at_is_kept_not_taken_for_deleted(tmp_path, capsys):
    """sync forgets a path only when it (and each missing folder above it) answers 'no such
    file'; any other answer (here a folder turned into a loop of links: 'Too many levels of
    symbolic links', as a share that is down or a folder without permission answers with
    their own errors) is reported and the image kept."""
    import os

    from cbir.indexing import source_state

    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    (src / "away").mkdir()
    copy_photos(src / "away", "food/coffee.jpg")
    (src / "deleted").mkdir()
    copy_photos(src / "deleted", "vehicles/rocket.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    shutil.rmtree(src / "away")
    os.symlink("away", src / "away")  # a loop: looking inside fails, but not with ENOENT
    shutil.rmtree(src / "deleted")  # a whole folder deleted: its photo is gone
    assert source_state(str(src / "away" / "coffee.jpg")) == "Too many levels of symbolic links"
    assert source_state(str(src / "deleted" / "rocket.jpg")) == "gone"
    capsys.readouterr()
    assert main(["sync", str(db)]) == 0
    err = capsys.readouterr().err
    assert f"kept {src / 'away' / 'coffee.jpg'}: cannot tell whether it still exists" in err
    assert "forgot 1 paths of deleted files, removed 1 images" in err
    assert sorted(Path(p).name for p in catalog_paths(db)) == ["chelsea.jpg", "coffee.jpg"]


def test_every_bad_file_is_skipped_with_its_reason_and_the_run_succeeds(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(TESTDATA / "bad", src)
    shutil.copy(TESTDATA / "photos" / "animals" / "chelsea.jpg", src)
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    err = capsys.readouterr().err.splitlines()
    skipped = {Path(line.split(": ")[0].removeprefix("skipping ")).name: line
               for line in err if line.startswith("skipping ")}  # fmt: skip
    assert sorted(skipped) == sorted(p.name for p in (TESTDATA / "bad").iterdir())
    assert "hidden" in skipped[".hidden.jpg"] and "AppleDouble" in skipped["._chelsea.jpg"]
    assert "decompression bomb" in skipped["bomb.png"] and "empty" in skipped["empty.jpg"]
    assert err[-1] == "indexed 1, unchanged 0, skipped 9"
    assert [Path(p).name for p in catalog_paths(db)] == ["chelsea.jpg"]
    assert main(["add", str(db), str(src), *LITE0, "--strict"]) == 3


def test_every_format_is_indexed_and_found_again(tmp_path, capsys):
    src = tmp_path / "formats"
    shutil.copytree(TESTDATA / "formats", src)
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0, "--strict"]) == 0
    assert "indexed 19, unchanged 0, skipped 0" in capsys.readouterr().err
    for name in ("photo.heic", "café au lait.jpg", "exif_orientation6.jpg", "grey16.png"):
        assert query_paths(db, src / name, capsys)[0] == str(src / name)


@pytest.mark.parametrize("option", ["hardlink", "symlink"])
def test_links_instead_of_copies(tmp_path, option):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0, "--link", option]) == 0
    stored = list(db.rglob("chelsea-*.jpg"))
    assert len(stored) == 4
    if option == "hardlink":
        assert all(p.stat().st_ino == (src / "chelsea.jpg").stat().st_ino for p in stored)
    else:
        assert all(p.is_symlink() and p.resolve() == (src / "chelsea.jpg") for p in stored)


def test_add_and_rerun_default_to_the_databases_own_settings(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0, "--top-k", "2", "--link", "hardlink"]) == 0
    more = copy_photos(tmp_path / "more", "food/coffee.jpg")
    assert main(["add", str(db), str(more)]) == 0  # no --model: the database's
    assert main(["create-db", str(src), str(db)]) == 0
    assert "indexed 0, unchanged 1, skipped 0" in capsys.readouterr().err
    assert all(len(r.wnids) == 2 for r in Database.open(db).images())
    assert main(["add", str(db), str(more), "--top-k", "4"]) == 1
    assert "was built with --top-k 2" in capsys.readouterr().err


def rows_by_category(db_dir: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    db = Database.open(db_dir)
    rows = {}
    for folder in sorted(db_dir.glob("n*_*")):
        category = committed_rows(db, folder)
        rows[folder.name] = (category.ids.tolist(), category.features.astype(np.float32))
    return rows


def assert_same_rows(db_dir: Path, reference_dir: Path) -> None:
    got, expected = rows_by_category(db_dir), rows_by_category(reference_dir)
    assert got.keys() == expected.keys()
    for name, (ids, features) in got.items():
        assert ids == expected[name][0], name
        np.testing.assert_allclose(features, expected[name][1], atol=2e-3)


def test_each_write_of_the_category_files_adds_a_segment_to_a_merged_folder(
    tmp_path, photos_dir, photos_db
):
    db = tmp_path / "db"  # 5 commits of 8: the category files are written 3 times
    assert main(["create-db", str(photos_dir), str(db), *LITE0, "--batch-size", "8",
                 "--commit-every", "1"]) == 0  # fmt: skip
    assert max(len(segments(folder)[0]) for folder in db.glob("n*_*")) > 1
    for folder in db.glob("n*_*"):
        live, stale = segments(folder)
        assert not stale and len(live) <= 3, folder
        assert merge_tail([seg.path.stat().st_size for seg in live]) == 0
    assert_same_rows(db, photos_db)  # built with one commit
    assert main(["check", str(db)]) == 0


@pytest.mark.parametrize("how", ["sync", "remove"])
def test_results_show_only_existing_paths_after_the_first_copy_is_deleted(tmp_path, capsys, how):
    """a.jpg indexed, an identical b.jpg added, a.jpg deleted: results come from the catalog's
    paths, which sync and remove keep current, never from a copy of a path kept elsewhere."""
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    (src / "chelsea.jpg").rename(src / "a.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0]) == 0
    shutil.copy(src / "a.jpg", src / "b.jpg")
    assert main(["add", str(db), str(src / "b.jpg")]) == 0
    assert query_paths(db, src / "b.jpg", capsys) == [str(src / "a.jpg")]  # one image
    (src / "a.jpg").unlink()
    if how == "sync":
        assert main(["sync", str(db)]) == 0
    else:
        assert main(["remove", str(db), str(src / "a.jpg")]) == 0
    assert "removed 0" in capsys.readouterr().err  # the image stays: b.jpg still has it
    assert query_paths(db, src / "b.jpg", capsys) == [str(src / "b.jpg")]
    assert main(["query", str(db), str(src / "b.jpg"), "--json", "--all"]) == 0
    [hit] = json.loads(capsys.readouterr().out)["results"]
    assert hit["path"] == str(src / "b.jpg") and hit["paths"] == [str(src / "b.jpg")]


def test_the_library_adopts_the_databases_settings_or_refuses_others(tmp_path, capsys):
    src = copy_photos(tmp_path / "src", "animals/chelsea.jpg")
    more = copy_photos(tmp_path / "more", "food/coffee.jpg")
    db = tmp_path / "db"
    built = IndexOptions(backbone="efficientnet_lite0", top_k=2, link="hardlink")
    assert index_paths(db, [src], built).indexed == 1
    assert index_paths(db, [more], IndexOptions()).indexed == 1  # the database's settings
    records = list(Database.open(db).images())
    assert [len(r.wnids) for r in records] == [2, 2]
    assert all(p.stat().st_nlink > 1 for p in db.glob("n*/*.jpg"))  # hard links, as built
    for other in (IndexOptions(top_k=4), IndexOptions(link="copy"), IndexOptions(pooling="gem"),
                  IndexOptions(backbone="resnet50", weights="none")):  # fmt: skip
        with pytest.raises(DatabaseError, match="was built with"):
            index_paths(db, [more], other)
