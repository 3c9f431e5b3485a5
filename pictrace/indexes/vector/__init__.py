"""Vector indexes behind one protocol; the catalogue is the system of record, an index is derived from it."""

from pictrace.indexes.vector.base import IndexInfo, VectorIndex
from pictrace.indexes.vector.faiss_index import FaissIndex, FaissParams

__all__ = ["FaissIndex", "FaissParams", "IndexInfo", "VectorIndex"]
