"""How far can decoding a photo for the model go below cbir's: libjpeg-turbo's eighth-scales
against Pillow's halves, and the floor that no scaling removes.

cbir.images.load_image lets Pillow's JPEG draft decode at 1/2, 1/4 or 1/8 (the smallest that
keeps the model's side), then filters bilinearly. libjpeg-turbo also decodes at 3/8, 5/8, 6/8
and 7/8; through simplejpeg (`pip install simplejpeg`, needed by this benchmark only) a
1024x768 photo for 224 px is decoded at 3/8 (384x288) instead of 1/2 (512x384). On distinct
real photos up to 1024 px (bench_speed.repeated_photos: the 37 test photos and cropped,
re-encoded copies), for both decoders:
  * single-thread core-ms per photo, decode and resize (file bytes already read), for the
    1024-px photos and the smaller ones, best of 3 passes;
  * the floor: Pillow's decoding at 1/8, which still entropy-decodes every coefficient;
  * how much the features move: EfficientNet-Lite0 (OpenVINO fp32) features of the 37 photos,
    the near-duplicates and evaldata, cosine between the decoders, beside the cosine between
    bf16 and fp32 features of the same pixels (the engine's own tolerance);
  * retrieval quality: `cbir evaluate ../shared/evaldata` (the real pipeline, a temporary
    database), with load_image as it is and with its decoding swapped for eighths.

    python bench/bench_decode.py [-n 300] [--json FILE]     # about 1 minute on 2 cores
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_db import TESTDATA, Bench, bench_arguments, machine  # noqa: E402
from bench_speed import image_files, repeated_photos  # noqa: E402

DECODERS = ("halves", "eighths")  # Pillow's draft (cbir's), libjpeg-turbo's eighth-scales
EVALDATA = TESTDATA.parent / "evaldata"
LARGE_SIDE = 1000  # photos whose long side is at least this count as "1024-px"


def core_ms(decode: Any, items: list[Any], passes: int = 3) -> float:
    """Single-thread CPU milliseconds per item of `decode`, best of `passes`."""
    for item in items[:5]:
        decode(item)
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        for item in items:
            decode(item)
        best = min(best, (time.process_time() - start) / len(items))
    return 1000 * best


def decode_eighths(
    path: Path, draft_side: int, data: bytes | None = None, *args: Any, **kwargs: Any
) -> Any:
    """cbir.images.decode_rgb with colour and greyscale JPEGs decoded by libjpeg-turbo at the
    smallest eighth-scale that keeps `draft_side` pixels (upright by their EXIF orientation);
    anything else, and anything it refuses, by decode_rgb itself."""
    import simplejpeg
    from PIL import Image, ImageOps

    from cbir import images

    data = path.read_bytes() if data is None else data
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=draft_side, min_width=draft_side)
    except ValueError:
        return images.decode_rgb(path, draft_side, data, *args, **kwargs)
    rgb = Image.fromarray(pixels, "RGB")
    with Image.open(io.BytesIO(data)) as header:
        rgb.getexif()[0x0112] = header.getexif().get(0x0112, 1)  # orientation
    return ImageOps.exif_transpose(rgb)


def load_eighths(path: Path, size: int, data: bytes | None = None) -> Any:
    from cbir.images import model_input

    return model_input(decode_eighths(path, size, data), size)


def decode_costs(paths: list[Path]) -> dict[str, Any]:
    from PIL import Image

    from cbir.images import load_image

    data = [(p, p.read_bytes()) for p in paths]
    sides = [max(Image.open(p).size) for p in paths]
    large = [side >= LARGE_SIDE for side in sides]
    groups = {"1024px": [d for d, big in zip(data, large, strict=True) if big],
              "smaller": [d for d, big in zip(data, large, strict=True) if not big]}

    def floor(item: tuple[Path, bytes]) -> None:
        with Image.open(io.BytesIO(item[1])) as im:
            im.draft("RGB", (im.width // 8, im.height // 8))
            im.load()

    loaders = {"halves": lambda item: load_image(item[0], 224, item[1]),
               "eighths": lambda item: load_eighths(item[0], 224, item[1]), "floor": floor}
    out: dict[str, Any] = {"photos": {k: len(v) for k, v in groups.items()}}
    for name, load in loaders.items():
        out[name] = {k: core_ms(load, v) for k, v in groups.items()}
    return out


def feature_shift() -> dict[str, float]:
    from cbir.images import is_image_name, load_image
    from cbir.model import load_model

    paths = sorted(p for folder in (TESTDATA / "photos", TESTDATA / "near_duplicates", EVALDATA)
                   for p in folder.rglob("*") if is_image_name(p))  # fmt: skip

    def features(precision: str, pixels: np.ndarray) -> np.ndarray:
        model = load_model("efficientnet_lite0", engine="openvino", precision=precision)
        f = np.concatenate([model.describe(pixels[i : i + 16]).features["gap"]
                            for i in range(0, len(pixels), 16)])  # fmt: skip
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    halves = np.stack([load_image(p, 224) for p in paths])
    eighths = np.stack([load_eighths(p, 224) for p in paths])
    plain = features("fp32", halves)
    between = np.sum(plain * features("fp32", eighths), axis=1)
    bf16 = np.sum(plain * features("bf16", halves), axis=1)
    changed = np.array([not np.array_equal(a, b) for a, b in zip(halves, eighths, strict=True)])
    return {"images": len(paths), "changed_pixels": int(changed.sum()),
            "decoders_cos_min": float(between.min()),
            "decoders_cos_median": float(np.median(between)),
            "cos_median_changed": float(np.median(between[changed])),
            "bf16_cos_min": float(bf16.min()),
            "bf16_cos_median": float(np.median(bf16))}  # fmt: skip


def evaluate_with(decoder: str) -> None:
    """Child: `cbir evaluate evaldata --json`, load_image decoding with `decoder`."""
    import cbir.images
    from cbir.cli import main

    if decoder == "eighths":
        cbir.images.decode_rgb = decode_eighths  # what load_image calls
    sys.exit(main(["evaluate", str(EVALDATA), "--model", "efficientnet_lite0", "--json"]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_evaluate":
        return evaluate_with(sys.argv[2])
    parser = bench_arguments(__doc__)
    parser.add_argument("-n", type=int, default=300, help="distinct photos to decode")
    args = parser.parse_args()
    bench = Bench(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    photos = image_files(repeated_photos(TESTDATA / "photos", image_files(TESTDATA / "photos"),
                                         args.n, args.work_dir))  # fmt: skip
    r: dict[str, Any] = {"machine": machine(), "n": len(photos)}
    bench.log(f"decode cost of {len(photos)} photos with each decoder")
    r["decode"] = decode_costs(photos)
    bench.log("features with each decoder, and bf16 against fp32")
    r["features"] = feature_shift()
    r["evaluate"] = {}
    for decoder in DECODERS:
        bench.log(f"cbir evaluate evaldata, decoding at {decoder}")
        child = bench.run(sys.executable, __file__, "_evaluate", decoder)
        r["evaluate"][decoder] = json.loads(child["stdout"])
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


def report(r: dict[str, Any]) -> str:
    d, f = r["decode"], r["features"]
    lines = [f"Machine: {r['machine']}", "",
             f"load_image, core-ms per photo     {d['photos']['1024px']:>4} at 1024 px"
             f"   {d['photos']['smaller']:>4} smaller"]  # fmt: skip
    for key, label in (("halves", "Pillow halves + bilinear (cbir)"),
                       ("eighths", "libjpeg-turbo eighths + bilinear"),
                       ("floor", "floor: decode at 1/8, no resize")):  # fmt: skip
        lines.append(f"  {label:<34}{d[key]['1024px']:>8.2f}{d[key]['smaller']:>17.2f}")
    before, after = d["halves"]["1024px"], d["eighths"]["1024px"]
    lines += [f"  eighths / halves at 1024 px: {after / before:.2f}", "",
              f"features of {f['images']} images ({f['changed_pixels']} get other pixels), "
              "cosine min / median:",
              f"  eighths against halves (fp32)     {f['decoders_cos_min']:.4f} / "
              f"{f['decoders_cos_median']:.4f} (changed images: {f['cos_median_changed']:.4f})",
              f"  bf16 against fp32 (same pixels)   {f['bf16_cos_min']:.4f} / "
              f"{f['bf16_cos_median']:.4f}", "",
              "cbir evaluate evaldata              mAP    P@10"]  # fmt: skip
    for decoder in DECODERS:
        e = r["evaluate"][decoder]["exhaustive"]
        lines.append(f"  {decoder:<32}{e['map']:>7.3f}{e['p_at_10']:>8.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
