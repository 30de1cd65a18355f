"""A fuzzed folder: a few hundred files made from the real test data with a fixed seed (byte
flips, truncations, bad headers, huge declared sizes, wrong extensions). One real create-db
over it must exit 0, index or skip (with a reason) every file, print nothing but its own
lines, and touch nothing outside its database."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from cbir.db import Database
from tests.conftest import TESTDATA, needs_shared
from tests.test_hostile_input import tree

pytestmark = needs_shared
REPO = Path(__file__).resolve().parent.parent
SEED = 20261201


def sources() -> list[Path]:
    return sorted(p for folder in ("photos", "formats") for p in (TESTDATA / folder).rglob("*")
                  if p.is_file())  # fmt: skip


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))  # fmt: skip

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))  # fmt: skip


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0/SOF2) claims another size."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    return data


def fuzzed_files(folder: Path, rng: np.random.Generator) -> list[Path]:
    originals = [(p, p.read_bytes()) for p in sources()]
    made: list[Path] = []

    def write(name: str, data: bytes) -> None:
        path = folder / name
        path.write_bytes(data)
        made.append(path)

    for i in range(110):  # byte flips: 1-64 bytes anywhere after the first 2
        path, data = originals[rng.integers(len(originals))]
        raw = bytearray(data)
        for at in rng.integers(2, len(raw), rng.integers(1, 65)):
            raw[at] ^= int(rng.integers(1, 256))
        write(f"flip{i:03d}{path.suffix}", bytes(raw))
    for i in range(60):  # truncations at any length, 0 bytes included
        path, data = originals[rng.integers(len(originals))]
        write(f"cut{i:03d}{path.suffix}", data[: int(rng.integers(0, len(data)))])
    for i in range(30):  # headers overwritten
        path, data = originals[rng.integers(len(originals))]
        noise = rng.integers(0, 256, int(rng.integers(4, 64)), np.uint8).tobytes()
        write(f"head{i:03d}{path.suffix}", noise + data[len(noise) :])
    for i in range(20):  # huge declared sizes
        width, height = (int(x) for x in rng.integers(1, 2**31 - 1, 2))
        write(f"hugepng{i:03d}.png", png_declaring(width, height))
        jpeg = next(d for p, d in originals if p.suffix.lower() == ".jpg")
        side = int(rng.integers(20000, 65536))
        write(f"hugejpg{i:03d}.jpg", jpeg_declaring(jpeg, side, side))
    suffixes = [".jpg", ".png", ".tif", ".webp", ".gif", ".bmp", ".heic"]
    for i in range(30):  # the wrong extension for the content
        path, data = originals[rng.integers(len(originals))]
        write(f"ext{i:03d}{suffixes[rng.integers(len(suffixes))]}", data)
    return made


def test_a_fuzzed_folder_is_indexed_or_skipped_file_by_file(tmp_path):
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    files = fuzzed_files(fuzz, np.random.default_rng(SEED))
    assert len(files) == 270
    before = tree(tmp_path)
    db = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), "create-db", str(fuzz),
                           str(db), "--model", "efficientnet_lite0"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    own = ("skipping ", "warning: ", "indexed ")
    assert [line for line in lines if not line.startswith(own)] == []  # no third-party noise
    skipped = {line.removeprefix("skipping ").split(": ", 1)[0] for line in lines
               if line.startswith("skipping ")}  # fmt: skip
    assert all(": " in line and line.split(": ", 1)[1] for line in lines
               if line.startswith("skipping "))  # fmt: skip
    indexed = {p for p, _ in Database.open(db).paths()}
    assert indexed.isdisjoint(skipped)
    assert indexed | skipped == {str(p) for p in files}  # every file: indexed or skipped
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("db")} == before
    assert subprocess.run([sys.executable, str(REPO / "bin" / "cbir"), "check", str(db)],
                          capture_output=True, env=env).returncode == 0  # fmt: skip
