"""Derived state: the vector index (``vector/``) and the local-feature index (``local/``), both rebuilt from the
catalogue at will, and ``DerivedIndexes`` (``keeper.py``), the one owner that keeps them in step with it."""

from pictrace.indexes.keeper import DerivedIndexes

__all__ = ["DerivedIndexes"]
