"""cbir: content-based image retrieval over a category-partitioned database.

The Python API (`cbir.create_db`, `cbir.open_db`) lives in cbir.api; it is imported on first
use, so that `import cbir` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_db", "open_db", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("create_db", "open_db"):
        from cbir import api

        return getattr(api, name)
    raise AttributeError(f"module 'cbir' has no attribute {name!r}")
