"""cbir: content-based image retrieval over a category-partitioned database."""

__version__ = "0.1.0"
