"""The search: named stages over plain data (candidates → verify → expand → rerank → present), run by
``Searcher`` (pipeline.py) on the threads schedule.py gives them."""

from pictrace.search.pipeline import Searcher

__all__ = ["Searcher"]
