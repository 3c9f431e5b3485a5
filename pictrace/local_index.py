"""The former home of the local-feature index, now ``pictrace.indexes.local``; kept for modules not moved over
yet."""

from pictrace.indexes.local import LocalIndex, Votes

__all__ = ["LocalIndex", "Votes"]
