"""`cbir serve` query latency next to the CLI's cold query, on the 60k Fashion-MNIST database.

    apt-get install dataset-fashion-mnist     # the 70,000 real images (once)
    python bench/bench_server.py              # builds the 60k database first if needed

The baseline is the wall time of one cold `cbir query DB IMAGE --json` (a fresh process: start-up,
model load, one gated query), median of 3, measured in the same run after a warm-up run. Then
a real `cbir serve` on 127.0.0.1 answers, from one client, 200 uploads of the 20 Fashion-MNIST
test images (POST /api/query) and 200 "more like this" queries by id (GET /api/query?id=);
and from 8 concurrent clients, 400 uploads. It prints p50/p99 latency of each and the ratio of
the upload p50 to the cold CLI query (target: <= 10 %). The 37-photo database gets the same
figures in the same run, for scale.

The databases and images live in bench_db.py's work folder (default $TMPDIR/cbir-bench-db), shared
with it; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_db import TESTDATA, Bench, bench_arguments, fashion, machine  # noqa: E402

from tests.serving import Server  # noqa: E402

SEQUENTIAL = 200
CLIENTS, PER_CLIENT = 8, 50
TARGET_P50_SHARE = 0.10


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
            "n": len(ms)}  # fmt: skip


def timed(call: Any) -> float:
    start = time.perf_counter()
    status, reply = call()
    if status != 200:
        raise SystemExit(f"request failed: {status} {reply}")
    return time.perf_counter() - start


def measure(bench: Bench, db: Path, images: list[Path]) -> dict[str, Any]:
    bench.cbir("query", str(db), str(images[0]), "--json")  # warms the OpenVINO cache
    cold = [bench.cbir("query", str(db), str(images[0]), "--json")["wall_s"] for _ in range(3)]
    uploads = [(p.name, p.read_bytes()) for p in images]
    os.environ.update(bench.env)
    server = Server(db)
    try:
        for name, data in uploads[:5]:  # warm-up
            server.upload("/api/query", data, name)
        def upload(i: int) -> tuple[int, Any]:
            name, data = uploads[i % len(uploads)]
            return server.upload("/api/query", data, name)

        upload_s = [timed(lambda i=i: upload(i)) for i in range(SEQUENTIAL)]
        _, first = server.upload("/api/query?n=50", uploads[0][1])
        ids = [h["id"] for h in first["results"]]
        by_id_s = [timed(lambda i=i: server.get(f"/api/query?id={ids[i % len(ids)]}"))
                   for i in range(SEQUENTIAL)]  # fmt: skip
        concurrent: list[float] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(PER_CLIENT):
                name, data = rng.choice(uploads)
                elapsed = timed(lambda d=data, m=name: server.upload("/api/query", d, m))
                with lock:
                    concurrent.append(elapsed)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        server.stop()
    result = {"cli_cold_s": statistics.median(cold), "upload": percentiles(upload_s),
              "by_id": percentiles(by_id_s), "concurrent_8": percentiles(concurrent),
              "concurrent_8_qps": len(concurrent) / wall}  # fmt: skip
    result["upload_p50_share_of_cli"] = result["upload"]["p50_ms"] / 1000 / result["cli_cold_s"]
    return result


def report(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']}", "",
             f"| {'':<44} | {'37 photos':>10} | {'60k Fashion':>11} |",
             f"| {'-' * 44} | {'-' * 10} | {'-' * 11} |"]  # fmt: skip

    def row(label: str, get: Any, fmt: str) -> None:
        lines.append(f"| {label:<44} | {format(get(results['photos']), fmt):>10} | "
                     f"{format(get(results['fashion']), fmt):>11} |")  # fmt: skip

    row("cold `cbir query` (baseline), s", lambda r: r["cli_cold_s"], ".2f")
    row("serve upload, 1 client: p50 ms", lambda r: r["upload"]["p50_ms"], ".1f")
    row("serve upload, 1 client: p99 ms", lambda r: r["upload"]["p99_ms"], ".1f")
    row("serve by id, 1 client: p50 ms", lambda r: r["by_id"]["p50_ms"], ".1f")
    row("serve by id, 1 client: p99 ms", lambda r: r["by_id"]["p99_ms"], ".1f")
    row("serve upload, 8 clients: p50 ms", lambda r: r["concurrent_8"]["p50_ms"], ".1f")
    row("serve upload, 8 clients: p99 ms", lambda r: r["concurrent_8"]["p99_ms"], ".1f")
    row("serve upload, 8 clients: queries/s", lambda r: r["concurrent_8_qps"], ".1f")
    row("upload p50 / cold CLI query", lambda r: r["upload_p50_share_of_cli"], ".1%")
    share = results["fashion"]["upload_p50_share_of_cli"]
    verdict = "PASS" if share <= TARGET_P50_SHARE else "FAIL"
    lines += ["", f"target on 60k: upload p50 <= {TARGET_P50_SHARE:.0%} of the cold CLI query: "
                  f"{share:.1%} {verdict}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = bench_arguments(__doc__).parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.work_dir)
    results: dict[str, Any] = {"machine": machine()}
    train, test_images = fashion(args.work_dir)
    photos_db, _ = bench.build("photos", TESTDATA / "photos")
    bench.log("the 37-photo database")
    results["photos"] = measure(bench, photos_db,
                                sorted((TESTDATA / "near_duplicates").glob("*.jpg"))[:20])
    fashion_db, _ = bench.build("fashion60k", train)
    bench.log("the 60k database")
    results["fashion"] = measure(bench, fashion_db, test_images)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
