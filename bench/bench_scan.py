"""An exact `--all` against plain scans of the same rows (issue 29), in one process, on the
60,000 Fashion-MNIST training images (efficientnet_lite0 features, d = 1280) stored through
the real writer, then after 1,000 more images were added:

    python bench/export_fashion_mnist.py /tmp/fm/train --per-class 6000 --split train
    python bench/export_fashion_mnist.py /tmp/fm/test --per-class 1000 --split test
    python bench/bench_scan.py --fashion /tmp/fm
    python bench/bench_scan.py --db DB_DIR      # an existing database, e.g. bench_db's 1M

Timed, median of 30 queries (30 stored images, each query by id, as "more like this"):
`cbir.open_db(DB, in_memory=True).query_id(id, n=10, all=True, exact=True)` (centred, query
expansion 3, hits with their paths: the whole answer), the same without `in_memory`, and the
default gated query; against FAISS IndexFlatIP (1 and 2 threads) and a numpy float32 matrix
product over the same rows held in RAM as float32 (plain inner products, top 10, nothing
else). Descriptions come from bench/quality_grid.py's cache (see bench/bench_growth.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_growth import add, collection  # noqa: E402

import cbir  # noqa: E402
from cbir.db import Settings, open_writer  # noqa: E402

QUERIES = 30


def median_ms(run: Callable[[int], object], ids: list[int]) -> float:
    run(ids[0])  # warm: first pass over the rows, model-free
    times = []
    for image_id in ids:
        start = time.perf_counter()
        run(image_id)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure(db_dir: Path, label: str) -> None:
    with cbir.open_db(db_dir, in_memory=True) as resident, cbir.open_db(db_dir) as plain:
        ids_rows = resident.database.catalog.all_rows()
        ids = np.random.default_rng(0).choice(ids_rows[0], QUERIES, replace=False).tolist()
        rows = resident.database.matrix().gather(ids_rows[1])  # (n, d) float32, in RAM
        row_of = dict(zip(ids_rows[0].tolist(), range(len(rows)), strict=True))
        start = time.perf_counter()
        resident.query_id(ids[0], 10, True, exact=True)
        first = 1000 * (time.perf_counter() - start)
        timings = {
            "ours: exact --all, matrix in memory": median_ms(
                lambda i: resident.query_id(i, 10, True, exact=True), ids),
            "ours: exact --all, matrix read per query": median_ms(
                lambda i: plain.query_id(i, 10, True, exact=True), ids[:10]),
            "ours: gated (default), matrix in memory": median_ms(
                lambda i: resident.query_id(i, 10), ids),
            "ours: gated (default), matrix read per query": median_ms(
                lambda i: plain.query_id(i, 10), ids),
        }  # fmt: skip
    flat = faiss.IndexFlatIP(rows.shape[1])
    flat.add(rows)
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        timings[f"FAISS IndexFlatIP, float32 in RAM, {threads} thread(s)"] = median_ms(
            lambda i: flat.search(rows[row_of[i]][None, :], 10), ids)  # fmt: skip
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    timings["numpy float32 product + argpartition"] = median_ms(
        lambda i: np.argpartition(-(rows @ rows[row_of[i]]), 10)[:10], ids)  # fmt: skip
    baseline = timings["FAISS IndexFlatIP, float32 in RAM, 1 thread(s)"]
    print(f"\n{label}: {len(rows):,} rows of {rows.shape[1]}; first exact --all after "
          f"opening (builds the centred copy): {first:.0f} ms\n")
    print("| search | median ms | / FAISS flat, 1 thread |\n|---|---|---|")
    for name, ms in timings.items():
        print(f"| {name} | {ms:.1f} | {ms / baseline:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=Path, help="exported Fashion-MNIST: build 60k")
    parser.add_argument("--db", type=Path, help="or measure this database as it is")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-growth"))
    args = parser.parse_args()
    if args.db is not None:
        measure(args.db, str(args.db))
        return
    if args.fashion is None:
        parser.error("give --fashion or --db")
    train = collection("fm_train", args.fashion / "train", args.cache)
    test = collection("fm_test", args.fashion / "test", args.cache)
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    settings = Settings("efficientnet_lite0", "imagenet", 1280, top_k=4, link="symlink")
    with tempfile.TemporaryDirectory(prefix="cbir-scan-") as tmp:
        db_dir = Path(tmp) / "db"
        with open_writer(db_dir, settings) as writer:
            add(writer, train, np.arange(len(train.paths)))
        measure(db_dir, "60k built in commits of 1024")
        with open_writer(db_dir, settings) as writer:
            add(writer, test, np.arange(1000))
        measure(db_dir, "after 1,000 more added")


if __name__ == "__main__":
    main()
