"""The local-feature index: every gallery image's strongest ORB descriptors, voted on by a query's own."""

from pictrace.indexes.local.file import LocalIndexCorruptError
from pictrace.indexes.local.index import LocalIndex
from pictrace.indexes.local.params import LocalIndexParams, local_index_params
from pictrace.indexes.local.votes import Votes

__all__ = ["LocalIndex", "LocalIndexCorruptError", "LocalIndexParams", "Votes", "local_index_params"]
