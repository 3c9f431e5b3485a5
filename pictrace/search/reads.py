"""What one query reads from the catalogue about its candidates: each thing once per candidate.

The stages ask for the same candidates more than once (verification, the mirror check, the read-out); the
catalogue is asked only for what this query has not read yet, and ORB blobs are parsed once. An image deleted
while the query runs is simply absent from the answers, as it would be from a fresh read.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pictrace.features.orb import OrbFeatures
from pictrace.store import CatalogueStore, ImageRecord


class QueryReads:
    """Per query, used by the thread that runs the search (the stages' maps never read)."""

    def __init__(self, catalogue: CatalogueStore) -> None:
        self._catalogue = catalogue
        self._orbs: dict[int, OrbFeatures | None] = {}  # None: asked for, not catalogued
        self._cosines: dict[int, float] = {}
        self._no_embedding: set[int] = set()
        self._grays: dict[int, bytes | None] = {}
        self._records: dict[int, ImageRecord | None] = {}

    def orbs(self, vec_ids: Iterable[int]) -> dict[int, OrbFeatures]:
        """The candidates' stored ORB features (each blob read and parsed once per query)."""
        wanted = list(dict.fromkeys(vec_ids))
        missing = [v for v in wanted if v not in self._orbs]
        if missing:
            self._orbs.update(dict.fromkeys(missing))
            self._orbs.update((v, OrbFeatures.from_bytes(blob)) for v, blob in self._catalogue.orb_blobs_of(missing))
        return {v: orb for v in wanted if (orb := self._orbs[v]) is not None}

    def know_cosines(self, cosines: dict[int, float]) -> None:
        """Cosines the vector index already gave (nothing to read for those)."""
        for vec_id, cosine in cosines.items():
            self._cosines.setdefault(vec_id, cosine)

    def cosines(self, embeddings: np.ndarray, vec_ids: Iterable[int]) -> dict[int, float]:
        """Each candidate's best cosine with the query's embeddings (rows: the query's, and the picture's inside
        it): those already known first, then those read now in the catalogue's order (the order breaks ties
        between equal scores)."""
        wanted = list(dict.fromkeys(vec_ids))
        known = {v: self._cosines[v] for v in wanted if v in self._cosines}
        missing = [v for v in wanted if v not in known and v not in self._no_embedding]
        read: dict[int, float] = {}
        rows = np.atleast_2d(embeddings).T
        for ids, vectors in self._catalogue.embeddings(missing):
            for vec_id, score in zip(ids.tolist(), (vectors @ rows).max(axis=1).tolist(), strict=True):
                read[int(vec_id)] = float(score)
        self._cosines.update(read)
        self._no_embedding.update(v for v in missing if v not in read)
        return known | read

    def grays(self, vec_ids: Iterable[int]) -> dict[int, bytes]:
        """The candidates' stored grey thumbnails, SSIM's gallery half."""
        wanted = list(dict.fromkeys(vec_ids))
        missing = [v for v in wanted if v not in self._grays]
        if missing:
            self._grays.update(dict.fromkeys(missing))
            self._grays.update(self._catalogue.grays_of(missing))
        return {v: gray for v in wanted if (gray := self._grays[v]) is not None}

    def records(self, vec_ids: Iterable[int]) -> dict[int, ImageRecord]:
        """What a result shows about each candidate (its name, URL, size, metadata)."""
        wanted = list(dict.fromkeys(vec_ids))
        missing = [v for v in wanted if v not in self._records]
        if missing:
            self._records.update(dict.fromkeys(missing))
            self._records.update(self._catalogue.records(missing))
        return {v: record for v in wanted if (record := self._records[v]) is not None}
