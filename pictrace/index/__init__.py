"""Vector indexes behind one protocol; the catalogue is the system of record, an index is derived from it."""

from pictrace.index.base import IndexInfo, VectorIndex
from pictrace.index.faiss_index import FaissIndex, FaissParams

__all__ = ["FaissIndex", "FaissParams", "IndexInfo", "VectorIndex"]
