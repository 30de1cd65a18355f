"""create-db on Ray against create-db on this machine, the writer's own capacity, and an
estimate for N nodes.

On the same distinct real photos (bench_speed.repeated_photos: the 37 test photos and cropped,
re-encoded copies of them, up to 1024 px), with EfficientNet-Lite0:
  * local `cbir create-db` and `cbir create-db --ray local`, each at n and 2n images in fresh
    databases: whole-run rates, and the marginal rate n / (wall(2n) - wall(n)), which leaves
    out start-up (loading the model; starting Ray and its actors);
  * the writer's commit capacity: the same images stored through cbir.db.open_writer with
    random features (an instant model, no decoding), committed as create-db commits them,
    which is the most images/s any cluster could feed one writer;
  * the raw forward rate of TensorFlow fp32 (cbir's tensorflow engine at fp32, batch 8) and the
    single-thread decode cost of cbir.images.load_image, in core-ms per photo;
  * an estimate for N nodes like this one: min(N x the Ray marginal rate, the writer's rate).

    python bench/bench_ray.py [-n 300] [--json FILE]      # about 5 minutes on 2 cores

Ray's start-up varies by seconds; where 2n images take less than a few times that (-n 300 on a
machine that indexes 250 img/s), take a larger -n.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_db import TESTDATA, Bench, bench_arguments, machine  # noqa: E402
from bench_speed import first_files, image_files, repeated_photos  # noqa: E402

MODEL = ("--model", "efficientnet_lite0")


def create_db(bench: Bench, source: Path, *extra: str) -> float:
    """Wall seconds of one create-db into a fresh database."""
    db = bench.work / "ray-bench.db"
    shutil.rmtree(db, ignore_errors=True)
    return bench.cbir("create-db", str(source), str(db), *MODEL, *extra)["wall_s"]


def writer_capacity(paths: list[Path], commit_every: int = 1024) -> float:
    """Images/s the writer stores with an instant model: random features, no decoding."""
    from cbir import categories
    from cbir.db import NewImage, Settings, open_writer
    from cbir.indexing import RECORD_EVERY_COMMITS

    rng = np.random.default_rng(3)
    wnids = categories.wnids()
    db = Path(tempfile.mkdtemp(prefix="cbir-writer-")) / "db"
    settings = Settings("efficientnet_lite0", "imagenet", 1280, top_k=4)
    images = []
    for path in paths:
        data = path.read_bytes()
        stat = path.stat()
        feature = rng.standard_normal(1280).astype(np.float32)
        probs = np.sort(rng.dirichlet(np.ones(8))[:4])[::-1]
        top = rng.choice(1000, 32, replace=False)
        images.append(NewImage(path, hashlib.sha256(data).hexdigest(), stat.st_size,
                               stat.st_mtime_ns, tuple(wnids[j] for j in top[:4]),
                               tuple(float(p) for p in probs), feature / np.linalg.norm(feature),
                               tuple(int(j) for j in top), tuple([0.01] * 32)))  # fmt: skip
    start = time.perf_counter()
    with open_writer(db, settings) as writer:
        writer.record_every = RECORD_EVERY_COMMITS * commit_every
        for i in range(0, len(images), commit_every):
            writer.place_copies(images[i : i + commit_every])
            writer.add_images(images[i : i + commit_every])
    elapsed = time.perf_counter() - start
    shutil.rmtree(db.parent, ignore_errors=True)
    return len(images) / elapsed


def forward_and_decode(paths: list[Path]) -> dict[str, float]:
    """TensorFlow fp32 forward images/s (batch 8) and load_image core-ms per photo."""
    from bench_speed import throughput

    from cbir.images import load_image
    from cbir.model import load_model

    model = load_model("efficientnet_lite0", engine="tensorflow", precision="fp32")
    batch = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), np.uint8)
    tf_rate = throughput(model.describe, batch, min_seconds=10.0)
    sample = paths[:100]
    for path in sample[:5]:
        load_image(path, 224)
    start = time.process_time()
    for path in sample:
        load_image(path, 224)
    decode_ms = 1000 * (time.process_time() - start) / len(sample)
    return {"tensorflow_fp32_img_s": tf_rate, "decode_core_ms": decode_ms}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_forward-and-decode":  # child: its own process
        print(json.dumps(forward_and_decode(image_files(Path(sys.argv[2])))))
        return
    parser = bench_arguments(__doc__)
    parser.add_argument("-n", type=int, default=300, help="images of the smaller run")
    args = parser.parse_args()
    bench = Bench(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    photos = repeated_photos(TESTDATA / "photos", image_files(TESTDATA / "photos"), 2 * args.n,
                             args.work_dir)  # fmt: skip
    small, large = first_files(photos, args.n), photos
    r: dict[str, Any] = {"machine": machine(), "n": args.n}
    bench.log("warm-up: the first create-db converts the model into the OpenVINO cache")
    create_db(bench, first_files(photos, 8))
    for key, extra in (("local", ()), ("ray_local", ("--ray", "local"))):
        bench.log(f"create-db {key}: {args.n} and {2 * args.n} images")
        walls = [create_db(bench, small, *extra), create_db(bench, large, *extra)]
        r[key] = {"wall_s": walls, "rate": 2 * args.n / walls[1],
                  "marginal_rate": args.n / (walls[1] - walls[0])}  # fmt: skip
    bench.log("the writer with an instant model")
    r["writer_img_s"] = writer_capacity(image_files(large))
    bench.log("TensorFlow fp32 forward rate and decode cost")
    child = bench.run(sys.executable, __file__, "_forward-and-decode", str(large))
    r.update(json.loads(child["stdout"].strip().splitlines()[-1]))
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


def report(r: dict[str, Any]) -> str:
    local, ray = r["local"], r["ray_local"]
    lines = [f"machine: {r['machine']}", "",
             "| | local create-db | --ray local | ratio (target >= 0.80) |", "|---|---|---|---|"]
    lines.append(f"| {r['n']} / {2 * r['n']} images, wall s | "
                 f"{local['wall_s'][0]:.1f} / {local['wall_s'][1]:.1f} | "
                 f"{ray['wall_s'][0]:.1f} / {ray['wall_s'][1]:.1f} | |")
    lines.append(f"| whole run of {2 * r['n']}, img/s | {local['rate']:.1f} | {ray['rate']:.1f} "
                 f"| {ray['rate'] / local['rate']:.2f} |")
    ratio = ray["marginal_rate"] / local["marginal_rate"]
    lines.append(f"| marginal (start-up left out), img/s | {local['marginal_rate']:.1f} | "
                 f"{ray['marginal_rate']:.1f} | {ratio:.2f} |")
    lines += ["", f"writer with an instant model: {r['writer_img_s']:.0f} img/s",
              f"TensorFlow fp32 forward (batch 8): {r['tensorflow_fp32_img_s']:.1f} img/s; "
              f"local create-db / that: {local['marginal_rate'] / r['tensorflow_fp32_img_s']:.2f}x "
              "(target >= 2.5x)",
              f"decode, cbir.images.load_image: {r['decode_core_ms']:.2f} core-ms per photo "
              "(target <= 1)", "", "estimate for N nodes like this one "
              "(min(N x Ray marginal rate, writer)):"]  # fmt: skip
    if ray["wall_s"][1] <= ray["wall_s"][0]:  # Ray's start-up varies by seconds
        lines.append(f"  none: the {2 * r['n']}-image run was not slower than the {r['n']}-image "
                     "one, so start-up noise hides the marginal rate; run with a larger -n")
        return "\n".join(lines)
    for n in (1, 2, 4, 8, 16, 32, 64):
        rate = min(n * ray["marginal_rate"], r["writer_img_s"])
        lines.append(f"  {n:3d} nodes: {rate:.0f} img/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
