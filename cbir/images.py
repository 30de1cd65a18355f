"""Finding image files and decoding them into model-ready RGB arrays.

Owns Pillow's configuration (HEIF support, decompression-bomb limit). Never imports TensorFlow.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from cbir.db.manifest import is_database
from cbir.errors import BadImage, ImageTooLarge

try:
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # HEIC files are then reported as not an image
    pass

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
)
DEFAULT_MAX_MEGAPIXELS = 100.0
MAX_FILE_BYTES = 200 << 20  # a source image file larger than this is refused, never read whole
# How images are shrunk to the model's input. A database records the filter its features were
# computed with and its queries use the same one. Bilinear (antialiased, like bicubic) costs
# 0.6 ms where bicubic costs 1.0 ms per photo after the JPEG draft, a third of all decoding,
# for the same retrieval quality (evaldata mAP 0.540 vs 0.539); databases made before it was
# recorded used bicubic.
RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DEFAULT_RESIZE = "bilinear"

# We check the pixel count ourselves (with a message that names the option), so Pillow's own
# limit, which only warns between 1x and 2x, is turned off.
Image.MAX_IMAGE_PIXELS = None

# Bytes a decode may need (the decoded pixels plus their RGB copy) before it is refused: the
# pixel limit alone let a 99,000,000 x 1 PNG through to a MemoryError that stopped the run.
MAX_DECODE_BYTES = 1 << 30
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3,
                    "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4,
                    "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # fmt: skip

# Pillow reports some damage (corrupt EXIF data, a truncated tag) as Python warnings. They
# are collected per decoding thread and reported as a warning naming the file, instead of
# reaching the terminal as a third-party message without one.
_collecting = threading.local()
_show_warning = warnings.showwarning


def _route_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
    collected = getattr(_collecting, "warnings", None)
    if collected is not None and issubclass(category, Warning):
        collected.append(str(message))
        return
    _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _route_warning
warnings.filterwarnings("always", module=r"PIL\..*")


def _silence_libtiff() -> None:
    """libtiff prints its complaints about a broken file ("tempfile.tif: Using code not yet in
    table.") straight onto the terminal, without the file's name; the decode error that
    follows is reported as the file's skip reason instead. Pillow does not expose libtiff's
    handlers, so the copy Pillow loaded is found in the process's map and told to be quiet."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            found = {line.split()[-1] for line in maps if "libtiff" in line.rsplit("/", 1)[-1]}
    except OSError:
        return
    for path in found:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter in (lib.TIFFSetErrorHandler, lib.TIFFSetWarningHandler):
            setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            setter(None)


_silence_libtiff()

# Errors Pillow and its plugins raise on broken files; others are bugs and keep their traceback.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_source(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a source image file, read only if it is a regular file of at most
    max_bytes: a FIFO would block forever and /dev/zero or a 3 GB file would fill the memory.
    Opened without blocking, then checked (fstat) before anything is read. Raises BadImage."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadImage(path, f"cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(path, "not a regular file (a pipe, a device or a socket)")
        if info.st_size > max_bytes:
            raise BadImage(path, f"larger than {max_bytes >> 20} MB ({info.st_size >> 20} MB)")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BadImage(path, f"cannot read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise BadImage(path, f"larger than {max_bytes >> 20} MB")
    return data


def find_images(paths: Iterable[Path], exclude: Path | None = None) -> Iterator[Path | BadImage]:
    """Image files under `paths` (files or folders, walked recursively, sorted).

    Symbolic links to folders are followed (each folder once). Hidden folders and files with
    unknown extensions are passed over silently; hidden image
    files and macOS AppleDouble files (`._*`) are yielded as `BadImage` so the caller can report
    them. `exclude` (the database being written, when it sits inside the source folder) and
    every folder that is a cbir database are not walked: a database never indexes the copies
    of one.
    """
    for root in paths:
        if root.is_file():
            yield root
            continue
        if not root.is_dir():
            yield BadImage(root, "no such file or folder")
            continue
        if is_database(root) or root == exclude:
            continue
        visited: set[tuple[int, int]] = set()  # symbolic links are followed, loops are not
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            current = Path(dirpath)
            stat = current.stat()
            if (stat.st_dev, stat.st_ino) in visited:
                dirnames[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and current / d != exclude
                and not is_database(current / d)
            )  # fmt: skip
            for name in sorted(filenames):
                path = current / name
                if not is_image_name(path):
                    continue
                if name.startswith("._"):
                    yield BadImage(path, "macOS AppleDouble metadata file, not an image")
                elif name.startswith("."):
                    yield BadImage(path, "hidden file")
                else:
                    yield path


def load_image(
    path: Path,
    size: int,
    data: bytes | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    resize: str = DEFAULT_RESIZE,
    warned: list[str] | None = None,
) -> npt.NDArray[np.uint8]:
    """Decode `path` (or its already-read bytes) into a (size, size, 3) uint8 RGB array.

    EXIF orientation is applied, the first frame of animations is used, transparency is
    flattened onto white and 16-bit images are scaled to 8 bits. The whole image is resized
    (no crop, with the `resize` filter), so near-duplicates that differ at the borders still
    match. Damage Pillow works around (corrupt EXIF data) is appended to `warned`.
    Raises BadImage (or ImageTooLarge) with the reason; never returns a partial image.
    """
    rgb = decode_rgb(path, size, data, max_megapixels, warned)
    return model_input(rgb, size, resize)


def model_input(rgb: Image.Image, size: int, resize: str = DEFAULT_RESIZE) -> npt.NDArray[np.uint8]:
    """An RGB image shrunk (whole, no crop) to the model's (size, size, 3) uint8 input."""
    rgb = rgb.resize((size, size), RESIZE_FILTERS[resize], reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def decode_rgb(
    path: Path,
    draft_side: int,
    data: bytes | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    warned: list[str] | None = None,
) -> Image.Image:
    """The upright 8-bit RGB image in `path` (or `data`), JPEGs decoded at the smallest DCT
    scale that keeps `draft_side` pixels; every guard of indexing applies (pixel limit,
    decode memory, bombs, damage). Raises BadImage with the reason."""
    _collecting.warnings = [] if warned is None else warned
    try:
        if data is None:
            data = read_source(path)
        if not data:
            raise BadImage(path, "empty file")
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.width * im.height
            if pixels > max_megapixels * 1e6:
                raise ImageTooLarge(path, pixels, int(max_megapixels * 1e6))
            if im.format == "JPEG":
                im.draft("RGB", (draft_side, draft_side))  # decode at a reduced scale: faster
            needed = im.width * im.height * (_BYTES_PER_PIXEL.get(im.mode, 4) + 3)
            if needed > MAX_DECODE_BYTES:
                raise BadImage(path, f"{im.width}x{im.height} would need {needed >> 20} MB to "
                                     f"decode, over the {MAX_DECODE_BYTES >> 20} MB limit "
                                     "(possible decompression bomb)")  # fmt: skip
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except MemoryError as exc:
        raise BadImage(path, "not enough memory to decode it") from exc
    except FileNotFoundError as exc:
        raise BadImage(path, "no such file") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(path, "not an image (unrecognised file format)") from exc
    except Image.DecompressionBombError as exc:
        raise BadImage(path, f"decompression bomb: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise BadImage(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    finally:
        _collecting.warnings = None


def thumbnail(
    path: Path, max_side: int, data: bytes | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> Image.Image:
    """An upright RGB copy at most `max_side` pixels on its long side (plots, the web page),
    decoded with the guards of `decode_rgb`."""
    rgb = decode_rgb(path, max_side, data, max_megapixels)
    rgb.thumbnail((max_side, max_side))
    return rgb


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float scaled, alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0
        im = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
