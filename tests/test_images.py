"""Decoding real files of many encodings, and reporting bad ones with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir.errors import BadImage, ImageTooLarge
from cbir.images import find_images, load_image
from tests.conftest import TESTDATA, needs_shared

pytestmark = needs_shared

EXPECTED_REASONS = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "not_an_image.jpg": "not an image",
    "document_pdf.jpg": "not an image",
    "archive_zip.png": "not an image",
    "bomb.png": "decompression bomb",
    "corrupt_middle.jpg": "broken data stream",
}


def test_every_format_decodes_to_a_model_ready_array():
    files = sorted((TESTDATA / "formats").iterdir())
    assert len(files) == 19
    for path in files:
        pixels = load_image(path, 64)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8, path.name
        assert 5 < pixels.mean() < 250, f"{path.name} decoded to a flat image"


def test_sixteen_bit_png_is_scaled_not_clipped_to_white():
    grey16 = load_image(TESTDATA / "formats" / "grey16.png", 64).astype(float)
    grey8 = load_image(TESTDATA / "formats" / "grey8.jpg", 64).astype(float)
    assert abs(grey16.mean() - grey8.mean()) < 10


def test_transparent_border_is_flattened_onto_white():
    pixels = load_image(TESTDATA / "formats" / "rgba_transparent_border.png", 128)
    assert pixels[0, 0].min() > 240  # the transparent corner is white, not black


def test_exif_orientation_is_applied():
    rotated = load_image(TESTDATA / "formats" / "exif_orientation6.jpg", 64).astype(float)
    upright = load_image(TESTDATA / "photos" / "people" / "grace_hopper.jpg", 64).astype(float)
    sideways = np.rot90(upright)
    assert np.abs(rotated - upright).mean() < np.abs(rotated - sideways).mean() / 2


@pytest.mark.parametrize("name", sorted(EXPECTED_REASONS))
def test_bad_file_raises_bad_image_with_its_reason(name):
    with pytest.raises(BadImage) as caught:
        load_image(TESTDATA / "bad" / name, 64)
    assert EXPECTED_REASONS[name] in caught.value.reason
    assert caught.value.path.name == name


def test_megapixel_limit_is_an_error_that_names_the_option():
    with pytest.raises(ImageTooLarge, match="--max-megapixels"):
        load_image(TESTDATA / "photos" / "animals" / "chelsea.jpg", 64, max_megapixels=0.1)


def test_walk_reports_hidden_and_appledouble_files_and_ignores_other_extensions(tmp_path):
    shutil.copytree(TESTDATA / "bad", tmp_path / "bad")
    (tmp_path / ".hidden_dir").mkdir()
    shutil.copy(TESTDATA / "photos" / "animals" / "chelsea.jpg", tmp_path / ".hidden_dir")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list(find_images([tmp_path]))
    reported = {f.path.name: f.reason for f in found if isinstance(f, BadImage)}
    assert reported == {
        "._chelsea.jpg": "macOS AppleDouble metadata file, not an image",
        ".hidden.jpg": "hidden file",
    }
    files = {f.name for f in found if isinstance(f, Path)}
    assert files == set(EXPECTED_REASONS)
