"""The former home of the vector index, now ``pictrace.indexes.vector``; kept for modules not moved over yet."""

from pictrace.indexes.vector import VectorIndex

__all__ = ["VectorIndex"]
