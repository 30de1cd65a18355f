"""Build cbir/data/class_hierarchy.json: the WordNet 3.0 words and ancestors of the 1000
ImageNet classes, for `cbir find`. Run at build time only (cbir never reads WordNet itself):

    apt-get install wordnet-base
    python scripts/build_class_hierarchy.py [/usr/share/wordnet/data.noun]

ImageNet class ids are WordNet 3.0 noun synsets ("n" + the synset's offset in data.noun). For
each class this records every ancestor through hypernym and instance-hypernym pointers, and
for the classes and their ancestors their words (lemmas). WordNet 3.0 is (c) 2006 Princeton
University, used under the WordNet 3.0 license (kept in the output's "license").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "cbir" / "data" / "class_hierarchy.json"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")
LICENSE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to "
    "use, copy, modify and distribute this software and database and its documentation for "
    "any purpose and without fee or royalty is hereby granted, provided that you agree to "
    "comply with the following copyright notice and statements, including the disclaimer, "
    "and that the same appear on ALL copies of the software, database and documentation, "
    "including modifications that you make for internal use or for distribution. THIS "
    "SOFTWARE AND DATABASE IS PROVIDED \"AS IS\" AND PRINCETON UNIVERSITY MAKES NO "
    "REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT "
    "LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- "
    "ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, "
    "DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, "
    "TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or Princeton may not be "
    "used in advertising or publicity pertaining to distribution of the software and/or "
    "database. Title to copyright in this software, database and any associated "
    "documentation shall at all times remain with Princeton University and LICENSEE agrees "
    "to preserve same."
)


def read_synsets(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """wnid -> (its words, the wnids of its hypernyms and instance hypernyms)."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, n_words = fields[0], int(fields[3], 16)
        words = [fields[4 + 2 * i] for i in range(n_words)]
        at = 4 + 2 * n_words
        n_pointers = int(fields[at])
        parents = []
        for i in range(n_pointers):
            symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
            if symbol in ("@", "@i") and pos == "n":
                parents.append("n" + target)
        synsets["n" + offset] = ([w.split("(")[0] for w in words], parents)
    return synsets


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_NOUN
    synsets = read_synsets(source)
    index = json.loads((REPO / "cbir" / "data" / "imagenet_class_index.json").read_text())
    classes = [index[str(i)][0] for i in range(len(index))]
    ancestors: dict[str, list[str]] = {}
    for wnid in classes:
        seen: list[str] = []
        todo = list(synsets[wnid][1])
        while todo:
            parent = todo.pop(0)
            if parent not in seen:
                seen.append(parent)
                todo += synsets[parent][1]
        ancestors[wnid] = seen
    named = sorted({*classes, *(a for found in ancestors.values() for a in found)})
    OUT.write_text(json.dumps({
        "source": f"WordNet 3.0, {source.name} (Debian package wordnet-base), read by "
                  "scripts/build_class_hierarchy.py",
        "license": LICENSE,
        "words": {wnid: synsets[wnid][0] for wnid in named},
        "ancestors": ancestors,
    }, separators=(",", ":"), sort_keys=True) + "\n")  # fmt: skip
    print(f"wrote {OUT}: {len(classes)} classes, {len(named)} synsets")


if __name__ == "__main__":
    main()
