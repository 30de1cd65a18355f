"""Hostile and odd input: every failure is one clear line, nothing is lost, and nothing outside
the database is created, read into the output or changed. The numbers are the cases of the
issue that found them (tampering, odd file names, bad files, full and read-only disks)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir.cli import main
from cbir.db import CATALOG_NAME, MANIFEST_NAME, Database
from cbir.db.category_files import CategoryRows, segments
from cbir.db.files import write_atomic
from tests.conftest import TESTDATA, needs_shared

pytestmark = needs_shared
REPO = Path(__file__).resolve().parent.parent
CHELSEA = TESTDATA / "photos" / "animals" / "chelsea.jpg"
LITE0 = ["--model", "efficientnet_lite0"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def one_clear_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: link target or size and content hash."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_file():
                found[str(path.relative_to(root))] = (path.stat().st_size,
                                                      hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture
def db(photos_db: Path, tmp_path: Path) -> Path:
    target = tmp_path / "db"
    shutil.copytree(photos_db, target, symlinks=True)
    return target


def chelsea_copies(db: Path) -> list[Path]:
    return sorted(db.glob("n*/chelsea-*.jpg"))


def set_manifest(db: Path, **fields: object) -> None:
    manifest = json.loads((db / MANIFEST_NAME).read_text())
    (db / MANIFEST_NAME).write_text(json.dumps({**manifest, **fields}))


# -- 1, 4: a manifest field is never trusted ---------------------------------------------------


@pytest.mark.parametrize("value", [1000000000000, -5, "1280"])
def test_repair_refuses_a_forged_feature_dim_and_deletes_nothing(db, value):
    before = tree(db)
    set_manifest(db, feature_dim=value)
    one_clear_line(run_cli("check", str(db), "--repair"), "feature_dim")
    after = tree(db)
    after.pop(MANIFEST_NAME), before.pop(MANIFEST_NAME)
    assert after == before  # nothing deleted or rewritten
    set_manifest(db, feature_dim=1280)
    assert run_cli("check", str(db)).returncode == 0
    assert Database.open(db).n_images() == 37


@pytest.mark.parametrize("field, value", [("resize", "lanczos"), ("top_k", "4"),
                                          ("feature_dim", 10**9), ("backbone", "../x"),
                                          ("link", "move"), ("n_images", -1)])  # fmt: skip
def test_every_manifest_field_is_validated(db, field, value):
    set_manifest(db, **{field: value})
    for command in ("info", "check"):
        one_clear_line(run_cli(command, str(db)), f"{MANIFEST_NAME} is damaged: {field}")


# -- 2, 3: never follow a link out of the database, never trust a name ------------------------


def test_repair_does_not_write_through_a_dangling_link_out_of_the_database(db, tmp_path):
    outside = tmp_path / "outside" / "x.jpg"
    outside.parent.mkdir()
    copy = chelsea_copies(db)[0]
    copy.unlink()
    copy.symlink_to(outside)
    assert main(["check", str(db)]) == 1
    assert main(["check", str(db), "--repair"]) == 0
    assert not outside.exists() and list(outside.parent.iterdir()) == []
    assert not copy.is_symlink() and copy.read_bytes() == CHELSEA.read_bytes()
    assert main(["check", str(db)]) == 0


def test_a_stored_name_that_climbs_out_is_dropped_not_written(db, tmp_path, photos_dir, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("UPDATE images SET stored_name = '../../../outside/x.jpg' "
                     "WHERE stored_name LIKE 'chelsea-%'")  # fmt: skip
    one_clear_line(run_cli("query", str(db), str(CHELSEA)), "damaged", "check --repair")
    assert main(["check", str(db)]) == 1
    assert "invalid fields" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0
    assert list(outside.iterdir()) == [] and not chelsea_copies(db)
    assert main(["check", str(db)]) == 0
    assert main(["create-db", str(photos_dir), str(db)]) == 0  # re-indexes what was dropped
    assert Database.open(db).n_images() == 37


def test_a_category_id_with_dots_is_an_error_never_a_traceback(db, capsys):
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        wnid = conn.execute("SELECT wnid FROM category_sizes LIMIT 1").fetchone()[0]
        for table in ("placements", "category_sizes"):
            conn.execute(f"UPDATE {table} SET wnid = '../../x' WHERE wnid = ?", (wnid,))
    for args in (["info", str(db)], ["query", str(db), str(CHELSEA)], ["check", str(db)],
                 ["remove", str(db), str(CHELSEA)]):  # fmt: skip
        done = run_cli(*args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert main(["check", str(db), "--repair"]) == 0
    assert main(["check", str(db)]) == 0


def test_forged_file_names_in_a_feature_file_are_never_shown_or_opened(db, tmp_path, capsys):
    folder = chelsea_copies(db)[0].parent
    [segment] = segments(folder)[0]
    with np.load(segment.path, allow_pickle=False) as npz:
        rows = CategoryRows(npz["ids"], npz["files"], npz["probs"], npz["features"])
    forged = np.array(["/etc/shadow", "../../x.jpg"] * len(rows), np.str_)[: len(rows)]
    write_atomic(segment.path, CategoryRows(rows.ids, forged, rows.probs, rows.features).writer())
    plot = tmp_path / "plot.png"
    assert main(["query", str(db), str(CHELSEA), "--json", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "/etc/shadow" not in out and "x.jpg" not in out
    assert main(["check", str(db)]) == 1
    assert "disagree with the catalog" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0 and main(["check", str(db)]) == 0


def test_stored_copies_replaced_by_links_to_system_files_are_found_and_replaced(db, capsys):
    for copy in chelsea_copies(db):
        copy.unlink()
        copy.symlink_to("/etc/passwd")
    assert main(["check", str(db)]) == 1
    assert "is a link, not a stored copy" in capsys.readouterr().out
    assert main(["check", str(db), "--repair"]) == 0
    assert all(not c.is_symlink() and c.read_bytes() == CHELSEA.read_bytes()
               for c in chelsea_copies(db))  # fmt: skip


# -- 5, 6, 7: one bad file never stops a run --------------------------------------------------


def wide_png(path: Path, width: int = 99_000_000) -> Path:
    """A real PNG of width x 1 grey pixels (about 100 KB compressed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))  # fmt: skip

    header = struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + bytes(width), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


MEMORY_LIMITED = """
import resource, sys
from pathlib import Path
from cbir.errors import BadImage
from cbir.images import load_image
with open("/proc/self/statm") as f:
    size = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (200 << 20), resource.RLIM_INFINITY))
try:
    load_image(Path(sys.argv[1]), 224)
except BadImage as bad:
    print("skipped:", bad.reason)
"""


def test_running_out_of_memory_while_decoding_is_a_bad_file(tmp_path):
    png = wide_png(tmp_path / "wide.png")
    done = subprocess.run([sys.executable, "-c", MEMORY_LIMITED, str(png)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr  # not a MemoryError: a bad file, with its reason
    assert done.stdout.startswith("skipped:") and "memory" in done.stdout, done.stdout


def test_a_picture_whose_decode_would_need_too_much_memory_is_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    wide_png(src / "wide.png", width=99_000_000 * 3)  # under the pixel limit at 3 rows
    shutil.copy(CHELSEA, src)
    db = tmp_path / "db"
    assert main(["create-db", str(src), str(db), *LITE0, "--max-megapixels", "1000"]) == 0
    err = capsys.readouterr().err
    assert "wide.png" in err and "MB limit" in err and "indexed 1" in err


def test_a_file_name_that_is_not_utf8_is_indexed_and_printed_safely(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    odd = os.fsencode(src) + b"/bad\xffbytes.jpg"
    shutil.copy(CHELSEA, odd)
    db = tmp_path / "db"
    done = run_cli("create-db", str(src), str(db), *LITE0)
    assert done.returncode == 0 and "indexed 1" in done.stderr, done.stderr
    done = run_cli("query", str(db), str(CHELSEA), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["path"].endswith("bad\\xffbytes.jpg")
    table = run_cli("query", str(db), str(CHELSEA))
    assert "bad\\xffbytes.jpg" in table.stdout and table.returncode == 0


def test_a_newline_in_a_file_name_stays_on_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(CHELSEA, src / "two\nlines.jpg")
    db = tmp_path / "db"
    assert run_cli("create-db", str(src), str(db), *LITE0).returncode == 0
    done = run_cli("query", str(db), str(CHELSEA))
    rows = [line for line in done.stdout.splitlines() if "lines.jpg" in line]
    assert len(rows) == 1 and "two\\nlines.jpg" in rows[0]


def test_corrupt_exif_is_a_warning_naming_the_file(tmp_path):
    import struct

    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    entries = (struct.pack("<HHII", 0x0112, 3, 1, 6)  # orientation 6
               + struct.pack("<HHII", 0x010E, 2, 4000, 5000))  # 4000 bytes past the end
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<I", 0)
    with Image.open(CHELSEA) as im:
        im.save(src / "bad_exif.jpg", exif=exif)
    db = tmp_path / "db"
    done = run_cli("create-db", str(src), str(db), *LITE0)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "bad_exif.jpg" in line]
    assert warnings and all(line.startswith("warning: ") for line in warnings), done.stderr
    assert "UserWarning" not in done.stderr and "indexed 1" in done.stderr


# -- 8, 9: full and read-only disks -----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), mounted for the test: needs root, as CI has."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_same_command_resumes(small_disk, photos_dir):
    db = small_disk / "db"
    done = run_cli("create-db", str(photos_dir), str(db), *LITE0, "--commit-every", "8")
    one_clear_line(done, "no space left on the device", "run the same command again")
    assert run_cli("info", str(db)).returncode == 0  # the partial database opens
    committed = Database.open(db).n_images()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    done = run_cli("create-db", str(photos_dir), str(db), *LITE0)
    assert done.returncode == 0 and f"unchanged {committed}" in done.stderr, done.stderr
    assert Database.open(db).n_images() == 37 and run_cli("check", str(db)).returncode == 0


@pytest.fixture
def read_only_db(db, tmp_path):
    """The database seen through a read-only bind mount."""
    view = tmp_path / "ro"
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(db), str(view)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    yield view
    subprocess.run(["umount", "-l", str(view)], check=False)


def test_a_read_only_database_is_checked_and_queried_and_refuses_writes(read_only_db, tmp_path):
    assert run_cli("check", str(read_only_db)).returncode == 0
    assert run_cli("query", str(read_only_db), str(CHELSEA)).returncode == 0
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(TESTDATA / "formats" / "baseline.jpg", extra)
    for args in (["add", str(read_only_db), str(extra)],
                 ["remove", str(read_only_db), str(CHELSEA)],
                 ["check", str(read_only_db), "--repair"]):  # fmt: skip
        one_clear_line(run_cli(*args), "read-only")
    one_clear_line(run_cli("create-db", str(extra), str(read_only_db / "new"), *LITE0),
                   "cannot create the database folder")  # fmt: skip


def test_plot_targets_and_database_paths_that_cannot_work_are_one_line(photos_db, tmp_path):
    query = ["query", str(photos_db), str(CHELSEA)]
    one_clear_line(run_cli(*query, "--plot", str(tmp_path / "missing" / "x.png")), "does not exist")
    one_clear_line(run_cli(*query, "--plot", str(tmp_path / "x.docx")), "cannot save a figure")
    one_clear_line(run_cli(*query, "--plot", str(tmp_path)), "is a folder")
    done = run_cli(*query, "--plot", str(tmp_path / "x"))  # 13: x.png, and it says so
    assert done.returncode == 0 and (tmp_path / "x.png").is_file() and "x.png" in done.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("not a database")
    one_clear_line(run_cli("info", str(a_file)), "is a file")
    one_clear_line(run_cli("add", str(a_file), str(CHELSEA)), "is a file")


# -- 10, 11, 12: surprises ---------------------------------------------------------------------


def test_a_failed_first_run_does_not_pin_its_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(CHELSEA, src)
    db = tmp_path / "db"
    done = run_cli("create-db", str(src), str(db))  # the default model: no weights offline
    assert done.returncode == 1 and "efficientnet_lite0" in done.stderr
    assert run_cli("create-db", str(src), str(db), *LITE0).returncode == 0
    assert Database.open(db).settings.backbone == "efficientnet_lite0"


def test_a_database_with_no_image_takes_the_settings_of_the_next_run(tmp_path):
    from cbir.db import Settings, open_writer

    db = tmp_path / "db"
    with open_writer(db, Settings("inception_resnet_v2", "imagenet", 1536)):
        pass  # a stub: created, nothing committed
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(CHELSEA, src)
    assert run_cli("create-db", str(src), str(db), *LITE0).returncode == 0
    assert Database.open(db).settings.backbone == "efficientnet_lite0"


def test_no_database_ever_indexes_another_database_or_itself(tmp_path, photos_db):
    src = tmp_path / "src"
    shutil.copytree(TESTDATA / "photos" / "animals", src / "animals")
    shutil.copytree(photos_db, src / "old" / "other.db")  # another database inside the source
    db = src / "sub" / "db"  # and this one inside it too
    done = run_cli("create-db", str(src), str(db), *LITE0)
    n = len(list((src / "animals").iterdir()))
    assert done.returncode == 0 and f"indexed {n}, unchanged 0, skipped 0" in done.stderr
    assert "known content" not in done.stderr
    done = run_cli("create-db", str(src), str(db), *LITE0)  # a re-run: its own copies stay out
    assert f"indexed 0, unchanged {n}, skipped 0" in done.stderr
    assert all(not Path(p).is_relative_to(db) for p, _ in Database.open(db).paths())


def test_a_folder_of_other_files_is_never_adopted_as_a_database(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(CHELSEA, src)
    before = tree(src)
    one_clear_line(run_cli("create-db", str(src), str(src), *LITE0), "not a cbir database")
    one_clear_line(run_cli("create-db", str(src), str(src.parent), *LITE0), "not a cbir database")
    assert tree(src) == before


# -- 14, 16: messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["create-db", str(CHELSEA), "/tmp/never-made"], "is a file: give a folder"),
    (["query", "DB", "x.jpg", "--model", "foo"], "see 'cbir query --help'"),
    (["query", "DB", "x.jpg", "-n", "abc"], "see 'cbir query --help'"),
    (["frobnicate"], "see 'cbir --help'"),
    (["create-db", "a", "b", "--commit-every", "0"], "--commit-every must be at least 1"),
    (["create-db", "a", "b", "--max-megapixels", "0"], "--max-megapixels must be more than 0"),
])  # fmt: skip
def test_usage_mistakes_are_one_line_and_exit_1(args, fragment, tmp_path):
    if args[0] == "create-db" and args[1] == "a":
        (tmp_path / "a").mkdir()
    one_clear_line(run_cli(*args, cwd=tmp_path), fragment)


@pytest.mark.parametrize("option", [["--query-expansion", "-1"], ["--min-candidates", "-5"]])
def test_out_of_range_search_options_are_refused(photos_db, option):
    one_clear_line(run_cli("query", str(photos_db), str(CHELSEA), *option), option[0])


def test_a_folder_as_query_queries_each_image_in_it(photos_db, capsys):
    folder = TESTDATA / "photos" / "food"
    assert main(["query", str(photos_db), str(folder), "--json", "-n", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["results"][0]["path"].split("/")[-1] for r in lines] == sorted(
        p.name for p in folder.iterdir())


def test_remove_and_sync_say_when_nothing_matched(db, tmp_path, capsys):
    assert main(["remove", str(db), str(tmp_path / "never.jpg")]) == 1
    err = capsys.readouterr().err
    assert "never.jpg is not in the database" in err
    assert main(["sync", str(db)]) == 0
    assert "no indexed source file is known to be gone" in capsys.readouterr().err


def test_ctrl_c_says_what_was_committed_and_check_calls_it_an_interrupted_write(
    tmp_path, photos_dir, monkeypatch, capsys
):
    import cbir.indexing

    real_describe, calls = cbir.indexing._describe, []

    def describe(*args, **kwargs):  # Ctrl-C while the third batch is being described
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_describe(*args, **kwargs)

    monkeypatch.setattr(cbir.indexing, "_describe", describe)
    db = tmp_path / "db"
    options = [*LITE0, "--batch-size", "8", "--commit-every", "8"]
    assert main(["create-db", str(photos_dir), str(db), *options]) == 130
    err = capsys.readouterr().err
    assert "interrupted after committing 16 images; run the same command again" in err
    assert main(["check", str(db)]) == 1
    out = capsys.readouterr().out
    assert "interrupted" in out and "next write completes" in out
    monkeypatch.setattr(cbir.indexing, "_describe", real_describe)
    assert main(["create-db", str(photos_dir), str(db), *options]) == 0
    assert main(["check", str(db)]) == 0


def test_a_fifo_among_the_sources_or_as_a_query_is_skipped_not_waited_on(tmp_path, capsys):
    """A FIFO named like a photo would block a plain open() forever (no writer ever comes);
    it is refused as not a regular file, by create-db and by query, and the run goes on."""
    import os
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TESTDATA / "photos" / "animals" / "chelsea.jpg", src)
    os.mkfifo(src / "pipe.jpg")
    db = tmp_path / "db"
    run = subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), "create-db", str(src),
                          str(db), "--model", "efficientnet_lite0"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "pipe.jpg: not a regular file" in run.stderr
    assert "indexed 1, unchanged 0, skipped 1" in run.stderr
    run = subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), "query", str(db),
                          str(src / "pipe.jpg")], capture_output=True, text=True, timeout=240)
    assert run.returncode != 0 and "not a regular file" in run.stderr


def test_a_category_folder_replaced_by_a_link_is_never_written_through(db, tmp_path):
    """A category folder turned into a link to a folder outside, with the catalog saying its
    rows are still to be written to the category files (as after a crash): the next writer
    must not write segments there (it wrote features.2-2.npz into the link's target)."""
    folder = chelsea_copies(db)[0].parent
    outside = tmp_path / "outside"
    shutil.move(str(folder), str(outside))
    folder.symlink_to(outside, target_is_directory=True)
    with sqlite3.connect(db / CATALOG_NAME) as conn:
        conn.execute("UPDATE meta SET value = 0 WHERE key = 'recorded_rows'")
    before = tree(outside)
    one_clear_line(run_cli("add", str(db), str(CHELSEA)), "is not a folder of this database",
                   "check --repair")  # fmt: skip
    assert tree(outside) == before
