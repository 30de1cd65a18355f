"""The Python API, used as the README shows it, on real photos."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cbir
from cbir.errors import BadImage, CbirError, DatabaseError
from tests.conftest import SHARED, TESTDATA, needs_shared

REPO = Path(__file__).resolve().parent.parent
CHELSEA_ROT5 = TESTDATA / "near_duplicates" / "chelsea__rot5.jpg"


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@needs_shared
def test_the_readmes_python_example_runs(tmp_path: Path) -> None:
    """The README's example, run as written from a folder beside ../shared."""
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    done = subprocess.run([sys.executable, "-c", readme_block("## Python API")], cwd=work,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6
    assert lines[0].endswith("photos/animals/chelsea.jpg  n02124075")  # the original, first
    assert lines[-1].startswith("37 images;")
    assert (work / "photos.db" / "catalog.sqlite").is_file()


def copy_with_extra(tmp_path: Path, photos_db: Path, names: dict[str, str]) -> tuple[Path, Path]:
    """(a private copy of the photos database, a folder of near-duplicates not in it, each
    under its new name: near_duplicates/NAME -> extra/NEW_NAME)."""
    copy, extra = tmp_path / "db", tmp_path / "extra"
    shutil.copytree(photos_db, copy)
    extra.mkdir()
    for name, new_name in names.items():
        shutil.copy(TESTDATA / "near_duplicates" / name, extra / new_name)
    return copy, extra


@pytest.fixture(scope="module")
def db(photos_db: Path):
    with cbir.open_db(photos_db) as opened:
        yield opened


@needs_shared
def test_a_query_may_be_a_path_bytes_an_array_or_a_pillow_image(db) -> None:
    by_path = db.query(CHELSEA_ROT5, n=5)
    assert Path(by_path.hits[0].path).name == "chelsea.jpg"
    by_bytes = db.query(CHELSEA_ROT5.read_bytes(), n=5, name="upload.jpg")
    with Image.open(CHELSEA_ROT5) as im:
        pixels = np.asarray(im.convert("RGB"))
        by_pillow = db.query(im, n=5)
    by_array = db.query(pixels, n=5)
    for other in (by_bytes, by_pillow, by_array):
        assert [h.id for h in other.hits] == [h.id for h in by_path.hits]
        np.testing.assert_allclose([h.score for h in other.hits],
                                   [h.score for h in by_path.hits], atol=2e-3)  # fmt: skip
    assert by_bytes.query_path == Path("upload.jpg")
    hit = by_path.hits[0]
    assert hit.categories[0] == by_path.categories[0].wnid == "n02124075"  # Egyptian cat
    assert hit.paths == (hit.path,)


@needs_shared
def test_more_like_an_image_it_holds_leaves_the_image_out(db) -> None:
    chelsea = db.query(CHELSEA_ROT5, n=1).hits[0]
    similar = db.query_id(chelsea.id, n=5)
    assert len(similar.hits) == 5
    assert chelsea.id not in [h.id for h in similar.hits]
    assert Path(similar.query_path).name == "chelsea.jpg"
    scores = [h.score for h in similar.hits]
    assert all(-1 <= s < 0.999 for s in scores)
    with pytest.raises(KeyError):
        db.query_id(12345, n=5)


@needs_shared
def test_bad_queries_raise_the_stores_errors(db) -> None:
    with pytest.raises(BadImage, match="not an image"):
        db.query(b"this is not an image")
    with pytest.raises(BadImage):
        db.query(TESTDATA / "bad" / "truncated.jpg")
    with pytest.raises(CbirError, match="uint8"):
        db.query(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(CbirError, match="n must be"):
        db.query(CHELSEA_ROT5, n=0)
    found = db.query_many([CHELSEA_ROT5, b"nope"], n=3)
    assert Path(found[0].hits[0].path).name == "chelsea.jpg"
    assert isinstance(found[1], BadImage)


@needs_shared
def test_info_and_categories_are_what_the_cli_reports(db, photos_db: Path) -> None:
    import json

    from tests.test_cli import run_cli

    cli = json.loads(run_cli("info", str(photos_db), "--json").stdout)
    assert db.info() == cli
    cats = db.categories()
    assert [c.images for c in cats] == sorted((c.images for c in cats), reverse=True)
    assert sum(c.images for c in cats) == 37 * 4  # every image in its top-4 categories
    total, page = db.category_images(cats[0].id, 0, 2)
    assert total == cats[0].images and len(page) == 2
    assert all(cats[0].id in im.categories for im in page)
    with pytest.raises(KeyError):
        db.category_images("n01440764")  # tench: no photo of one


@needs_shared
def test_add_and_remove_keep_the_databases_settings(tmp_path: Path, photos_db: Path) -> None:
    copy, extra = copy_with_extra(tmp_path, photos_db, {"coffee__grey.jpg": "grey coffee.jpg"})
    with cbir.open_db(copy) as db:
        report = db.add([extra])
        assert (report.indexed, len(report.skipped)) == (1, 0)
        assert db.info()["images"] == 38  # seen without reopening
        grey = db.query(extra / "grey coffee.jpg", n=1).hits[0]
        assert grey.path == str(extra / "grey coffee.jpg")
        with pytest.raises(DatabaseError, match="top-k"):
            db.add([extra], top_k=2)
        removal = db.remove([extra / "grey coffee.jpg"])
        assert (removal.images, removal.paths) == (1, 1)
        assert db.info()["images"] == 37


@needs_shared
@pytest.mark.parametrize("in_memory", [False, True])
def test_an_empty_database_answers_with_no_results(tmp_path: Path, in_memory: bool) -> None:
    (tmp_path / "empty").mkdir()
    cbir.create_db(tmp_path / "empty", tmp_path / "db", model="efficientnet_lite0")
    with cbir.open_db(tmp_path / "db", in_memory=in_memory) as db:
        db.warm_up()
        assert db.query(CHELSEA_ROT5).hits == ()
        assert db.query(CHELSEA_ROT5, all=True).hits == ()
        assert db.categories() == [] and db.info()["images"] == 0
        with pytest.raises(KeyError):
            db.query_id(1)


@needs_shared
def test_one_path_given_as_a_string_is_one_path(tmp_path: Path, photos_db: Path) -> None:
    """A lone string is never taken for a sequence of one-character paths ("/" is all)."""
    copy = tmp_path / "db"
    shutil.copytree(photos_db, copy)
    with cbir.open_db(copy) as db:
        cheetah = next(p for p in (h.path for h in db.query(CHELSEA_ROT5, n=37).hits)
                       if p.endswith("animals/IMG_0001.jpg"))  # fmt: skip
        removal = db.remove(cheetah)
        assert (removal.images, removal.paths) == (1, 1)
        assert db.info()["images"] == 36
        with pytest.raises(CbirError, match="list of images"):
            db.query_many(str(CHELSEA_ROT5))


@needs_shared
def test_a_symlinked_database_serves_a_source_only_with_its_indexed_content(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(TESTDATA / "photos" / "food" / "coffee.jpg", source / "coffee.jpg")
    shutil.copy(TESTDATA / "photos" / "animals" / "chelsea.jpg", source / "chelsea.jpg")
    cbir.create_db(source, tmp_path / "db", model="efficientnet_lite0", link="symlink")
    with cbir.open_db(tmp_path / "db") as db:
        coffee = db.query(source / "coffee.jpg", n=1).hits[0]
        assert db.image_bytes(coffee.id)[1] == (source / "coffee.jpg").read_bytes()
        shutil.copy(TESTDATA / "photos" / "food" / "cherries.jpg", source / "coffee.jpg")
        assert db.image_bytes(coffee.id) is None  # another content now: not served as this id


@needs_shared
def test_a_server_side_matrix_recovers_from_a_failed_read(tmp_path: Path, photos_db: Path) -> None:
    """Rows a failed refresh did not read are read by the next one, never left as zeros."""
    from cbir.query import ResidentMatrix

    copy, extra = copy_with_extra(tmp_path, photos_db, {"chelsea__grey.jpg": "chelsea__grey.jpg",
                                                        "coffee__hflip.jpg": "coffee__hflip.jpg"})
    with cbir.open_db(copy) as db:
        reader = db.database
        resident = ResidentMatrix(reader.settings.feature_dim)
        resident.refresh(reader)
        db.add([extra])
        matrix = next(copy.glob("matrix-*.f16"))
        whole = matrix.read_bytes()
        matrix.write_bytes(whole[: 37 * 2 * reader.settings.feature_dim])  # the new rows lost
        reader.close()
        with pytest.raises(DatabaseError):
            resident.refresh(reader)
        matrix.write_bytes(whole)
        reader.close()
        resident.refresh(reader)
        assert len(resident.rows) == 39
        stored = np.frombuffer(whole, "<f2").reshape(-1, reader.settings.feature_dim)[:39]
        np.testing.assert_array_equal(resident.rows.buffer_view().view("<f2"), stored)
