"""`cbir query --plot`: the figure follows -n, numbers ranks, tells files apart, and renders
any file name."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from cbir.api import open_db
from cbir.cli import main
from cbir.plotting import MAX_RESULTS, hit_labels, plot_results, renderable
from cbir.query import Hit
from tests.conftest import TESTDATA, needs_shared
from tests.test_cli import run_cli

pytestmark = needs_shared
PHOTOS = TESTDATA / "photos"


def hit(path: Path) -> Hit:
    return Hit(str(path), 0.5, 1, ("n02124075",), path, (str(path),), 0.7)


def test_labels_show_as_much_of_the_path_as_tells_the_files_apart() -> None:
    cheetah, mountains = PHOTOS / "animals" / "IMG_0001.jpg", PHOTOS / "landscapes" / "IMG_0001.jpg"
    koala = PHOTOS / "animals" / "koala.jpg"
    assert hit_labels([hit(cheetah), hit(mountains)]) == ["…/animals/IMG_0001.jpg",
                                                          "…/landscapes/IMG_0001.jpg"]
    assert hit_labels([hit(cheetah), hit(koala)]) == ["…/IMG_0001.jpg", "…/koala.jpg"]


def test_the_figure_follows_n_and_numbers_each_rank(photos_db: Path, tmp_path: Path) -> None:
    with open_db(photos_db) as db:
        results = [db.query(TESTDATA / "near_duplicates" / "red_panda__crop90.jpg", n=7),
                   db.query(TESTDATA / "near_duplicates" / "coffee__rot5.jpg", n=30)]
    titles = plot_results(results, tmp_path / "plot.png", n_results=30)
    assert len(titles) == 2 + 7 + MAX_RESULTS  # the second query is capped
    assert titles[0].startswith("query\nred_panda__crop90.jpg\npredicted: lesser panda")
    assert [t.split()[0] for t in titles[1:8]] == [f"#{r}" for r in range(1, 8)]
    assert titles[1].startswith(f"#1   score {results[0].hits[0].score:.3f}\n…/red_panda.jpg")
    with Image.open(tmp_path / "plot.png") as im:  # rows of 5: 2 for 7 hits, 4 for 20
        assert im.size == (100 * 2.9 * 6, 100 * 3.3 * (2 + 4))


def test_file_names_in_any_script_render_without_glyph_warnings(tmp_path: Path) -> None:
    source = tmp_path / "写真"
    source.mkdir()
    shutil.copy(PHOTOS / "animals" / "chelsea.jpg", source / "猫の写真.jpg")
    shutil.copy(PHOTOS / "food" / "coffee.jpg", source / "café ☕ ünïcödé.jpg")
    db = tmp_path / "db"
    assert main(["create-db", str(source), str(db), "--model", "efficientnet_lite0"]) == 0
    plot = tmp_path / "plot.png"
    done = run_cli("query", str(db), str(source / "猫の写真.jpg"), "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"saved plot {plot}"  # no "Glyph ... missing" warnings
    assert plot.stat().st_size > 10_000


def test_characters_no_font_has_are_written_as_their_code() -> None:
    latin = frozenset(range(0x250))
    assert renderable("猫.jpg", latin) == "\\u732b.jpg"
    assert renderable("café.jpg", latin) == "café.jpg"


def test_dollar_signs_in_names_are_text_not_math(tmp_path: Path) -> None:
    import numpy as np

    from cbir.plotting import plot_map

    points = np.random.default_rng(0).random((20, 2)).astype(np.float32)
    labels = ["a$^$b", "$5 $10"] * 10
    assert plot_map(points, labels, [], tmp_path / "map.png", "prices $5 and $10") == labels[:2]
