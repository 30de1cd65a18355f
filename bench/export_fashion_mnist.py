"""Export Fashion-MNIST (Debian package dataset-fashion-mnist) to one folder of PNGs per class,
the layout `cbir evaluate LABELLED_DIR` reads.

    apt-get install dataset-fashion-mnist
    python bench/export_fashion_mnist.py /tmp/fashion --per-class 100
    cbir evaluate /tmp/fashion --model efficientnet_lite0

The images are 28x28 greyscale product photos; the first N of each class in file order are
written (deterministic), as `<class>/<split>_<index>.png`.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """An IDX file (gzipped): images (n, 28, 28) or labels (n,), uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def export(source: Path, target: Path, split: str, per_class: int) -> int:
    """Write the first `per_class` images of each class of `split`; returns images written."""
    images_file, labels_file = FILES[split]
    images, labels = read_idx(source / images_file), read_idx(source / labels_file)
    written = 0
    for label, name in enumerate(CLASSES):
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index], "L").save(folder / f"{split}_{index:05d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="output folder (one sub-folder per class)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--split", choices=sorted(FILES), default="test")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()
    if not (args.source / FILES[args.split][0]).is_file():
        raise SystemExit(f"no Fashion-MNIST in {args.source}: install dataset-fashion-mnist")
    n = export(args.source, args.target, args.split, args.per_class)
    print(f"wrote {n} images in {len(CLASSES)} class folders under {args.target}")


if __name__ == "__main__":
    main()
