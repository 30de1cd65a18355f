"""`cbir find` quality: precision@10 and AP on evaldata's classes that are WordNet concepts,
alone and among the 60k Fashion-MNIST images.

    python bench/bench_find.py        # a few minutes once bench_db.py's 60k database exists

For each of fruit, vegetable, tool, mammal, invertebrate, vehicle and musical instrument,
`cbir find DB WORD` ranks the whole database; the relevant images are evaldata's photos of that
label. AP: the mean, over the relevant images, of the precision at each one's rank (one the
ranking leaves out counts 0). Databases (efficientnet_lite0): evaldata alone (164 photos), and a
copy of bench_db.py's 60k database with evaldata added. The catalog keeps each image's top-4
class probabilities; "all 1000" ranks evaldata alone by the full probability vectors (the
model run here on the same photos), to show what keeping only the top 4 costs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_db import REPO, Bench, bench_arguments, fashion  # noqa: E402

EVALDATA = REPO.parent / "shared" / "evaldata"
CONCEPTS = {"fruit": "fruit", "vegetable": "vegetable", "tool": "tool", "mammal": "mammal",
            "invertebrate": "invertebrate", "vehicle": "vehicle",
            "musical_instrument": "musical instrument"}  # fmt: skip


def average_precision(ranked: list[bool], n_relevant: int) -> float:
    hits, total = 0, 0.0
    for rank, relevant in enumerate(ranked, start=1):
        if relevant:
            hits += 1
            total += hits / rank
    return total / n_relevant


def score(ranked_paths: list[str], label: str) -> dict[str, float]:
    relevant = [Path(p).parent.name == label and Path(p).parent.parent.name == "evaldata"
                for p in ranked_paths]  # fmt: skip
    n = sum(1 for _ in (EVALDATA / label).glob("*.jpg"))
    return {"p_at_10": sum(relevant[:10]) / 10, "ap": average_precision(relevant, n)}


def run_find(bench: Bench, db: Path) -> dict[str, dict[str, float]]:
    out = {}
    for label, words in CONCEPTS.items():
        found = json.loads(bench.cbir("find", str(db), *words.split(), "-n", "100000",
                                      "--json")["stdout"])  # fmt: skip
        out[label] = score([r["path"] for r in found["results"]], label)
    return out


def full_probabilities() -> dict[str, dict[str, float]]:
    """The same ranking from all 1000 probabilities of each evaldata photo."""
    from cbir import categories
    from cbir.concepts import match
    from cbir.images import load_image
    from cbir.model import load_model

    model = load_model("efficientnet_lite0")
    paths = sorted(EVALDATA.glob("*/*.jpg"))
    pixels = [load_image(p, model.backbone.input_size) for p in paths]
    probs = model.describe_in_batches(pixels, 16).probs
    index = {w: i for i, w in enumerate(categories.wnids())}
    out = {}
    for label, words in CONCEPTS.items():
        _, classes = match(words.split())
        mass = probs[:, [index[w] for w in classes]].sum(axis=1)
        order = np.argsort(-mass, kind="stable")
        out[label] = score([str(paths[i]) for i in order], label)
    return out


def main() -> None:
    args = bench_arguments(__doc__).parse_args()
    bench = Bench(args.work_dir)
    alone, _ = bench.build("evaldata", EVALDATA)
    results: dict[str, Any] = {"alone_top4": run_find(bench, alone)}
    results["alone_all_1000"] = full_probabilities()
    train, _ = fashion(args.work_dir)
    fashion_db, _ = bench.build("fashion60k", train)
    mixed = args.work_dir / "fashion60k-evaldata.db"
    if not mixed.exists():
        bench.log("copying the 60k database and adding evaldata")
        shutil.copytree(fashion_db, mixed, symlinks=True)
        bench.cbir("add", str(mixed), str(EVALDATA))
    results["among_60k_top4"] = run_find(bench, mixed)
    print("| concept | P@10 alone | AP alone | AP alone, all 1000 probs | P@10 among 60k | "
          "AP among 60k |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in CONCEPTS:
        a, f, m = (results[k][label] for k in ("alone_top4", "alone_all_1000", "among_60k_top4"))
        print(f"| {label} | {a['p_at_10']:.2f} | {a['ap']:.3f} | {f['ap']:.3f} | "
              f"{m['p_at_10']:.2f} | {m['ap']:.3f} |")  # fmt: skip
    means = {k: float(np.mean([v["ap"] for v in results[k].values()])) for k in results}
    print(f"| mean AP | | {means['alone_top4']:.3f} | {means['alone_all_1000']:.3f} | | "
          f"{means['among_60k_top4']:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
