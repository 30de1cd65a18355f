"""`cbir serve` under load while `cbir add` commits beside it: 8 clients x 50 queries on
loopback, bounded. Every answer must be whole and correct; latencies are reported, not judged
(speed is measured in bench/, not asserted in tests)."""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import TESTDATA, needs_shared
from tests.serving import REPO, Server

pytestmark = needs_shared
CLIENTS, QUERIES = 8, 50
ARTIFACTS = REPO / "test-artifacts"


def test_eight_clients_query_while_cbir_add_commits(photos_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "photos.db"
    shutil.copytree(photos_db, db)
    new = tmp_path / "new"
    shutil.copytree(TESTDATA / "near_duplicates", new)
    uploads = [p.read_bytes() for p in sorted(new.glob("*__q30.jpg"))]
    server = Server(db)
    try:
        _, listing = server.get("/api/categories")
        assert listing["images"] == 37
        _, first = server.get(f"/api/categories/{listing['categories'][0]['id']}")
        known = [im["id"] for im in first["images"]]
        adder = subprocess.Popen(
            [sys.executable, str(REPO / "bin" / "cbir"), "add", str(db), str(new),
             "--commit-every", "2"], stderr=subprocess.PIPE, text=True)  # fmt: skip
        latencies: list[float] = []
        errors: list[str] = []
        sizes_seen: set[int] = set()
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(QUERIES):
                start = time.perf_counter()
                try:
                    if i % 2:
                        status, reply = server.upload("/api/query?n=5", rng.choice(uploads))
                    else:
                        status, reply = server.get(f"/api/query?id={rng.choice(known)}&n=5")
                except Exception as exc:  # noqa: BLE001 (any failure is an error to count)
                    status, reply = -1, repr(exc)
                elapsed = time.perf_counter() - start
                ok = status == 200 and len(reply["results"]) == 5 and all(
                    h["thumbnail"] == f"/api/thumbnails/{h['id']}" for h in reply["results"])
                with lock:
                    latencies.append(elapsed)
                    if not ok:
                        errors.append(f"{status}: {str(reply)[:300]}")
                    else:
                        sizes_seen.add(reply["searched"] + (i % 2 == 0))  # by id: itself left out

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - started
        assert adder.wait(timeout=600) == 0, adder.stderr.read()
        assert errors == [], errors[:5]
        assert len(latencies) == CLIENTS * QUERIES
        # Queries saw the database grow commit by commit (each searches it whole: it is small).
        assert 37 in sizes_seen and len(sizes_seen) >= 3, sorted(sizes_seen)
        _, listing = server.get("/api/categories")
        assert listing["images"] == 37 + 64  # every near-duplicate added, seen without restart
        assert not [line for line in server.stderr if "Traceback" in line], server.stderr
    finally:
        server.stop()
    ms = sorted(1000 * s for s in latencies)
    report = {"clients": CLIENTS, "queries": len(ms), "errors": len(errors),
              "p50_ms": round(statistics.median(ms), 1),
              "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1), "wall_s": round(wall, 1),
              "database_sizes_seen": sorted(sizes_seen)}  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "server_load.json").write_text(json.dumps(report, indent=1))
    print(f"\nserver load: {report}")


