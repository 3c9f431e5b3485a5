"""The search pipeline, plain Python shared by the web app, the CLI, the eval command and the tests.

decode → sha256 (exact hit?) → embed → K nearest vectors → re-rank (SSIM, ORB+RANSAC) → fuse → top-k.
"""

from __future__ import annotations

import time

import numpy as np

from pictrace.config import Settings
from pictrace.decode import DecodedImage, decode_image
from pictrace.features.embed import Embedder
from pictrace.features.hashing import pixel_sha256, sha256_hex
from pictrace.index import VectorIndex
from pictrace.mirror import mirror_pass
from pictrace.ranking import CandidateScore, QueryFeatures, verify, with_ssim
from pictrace.schemas import ComponentScores, Match, QueryInfo, SearchResult
from pictrace.store import Catalogue
from pictrace.transform import read_transform, transform_info
from pictrace.verdict import VerdictThresholds, classify


class Searcher:
    def __init__(self, catalogue: Catalogue, index: VectorIndex, embedder: Embedder, settings: Settings) -> None:
        self.catalogue = catalogue
        self.index = index
        self.embedder = embedder
        self.settings = settings

    def search_bytes(self, data: bytes, top_k: int | None = None) -> SearchResult:
        """Search with an encoded image (upload, download or file). Raises the decode errors on bad input."""
        started = time.perf_counter()
        image = decode_image(data, max_pixels=self.settings.max_pixels)
        return self.search_image(image, sha256_hex(data), top_k, started)

    def search_image(
        self, image: DecodedImage, sha256: str, top_k: int | None = None, started: float | None = None
    ) -> SearchResult:
        started = time.perf_counter() if started is None else started
        top_k = top_k or self.settings.top_k
        embedding = self.embedder.embed([image.rgb])[0]
        cosines = self._nearest(embedding)
        exact = self.catalogue.vec_ids_by_hash(sha256, pixel_sha256(image.rgb))
        for vec_id in exact:
            cosines.setdefault(vec_id, self._cosine(embedding, vec_id))
        query = QueryFeatures.compute(image.rgb, embedding, self.settings)
        stored = self.catalogue.rerank_features(cosines)
        verified = [verify(query, v, cosines[v], stored[v], self.settings) for v in cosines if v in stored]
        exact_set = set(exact)
        verified.sort(key=lambda c: (c.vec_id in exact_set, c.fused), reverse=True)
        shortlist = [with_ssim(query, c, stored[c.vec_id], self.settings) for c in verified[: 2 * top_k]]
        shortlist = mirror_pass(image.rgb, shortlist, stored, self.settings)
        ranked = sorted(shortlist, key=lambda c: (c.vec_id in exact_set, c.fused), reverse=True)
        kept = [c for c in ranked if c.vec_id in exact_set or c.fused >= self.settings.min_score]
        return SearchResult(
            query=QueryInfo(sha256=sha256, width=image.width, height=image.height),
            results=self._describe(kept, exact_set, (image.width, image.height))[:top_k],
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _nearest(self, embedding: np.ndarray) -> dict[int, float]:
        scores, ids = self.index.search(embedding[None, :], self.settings.candidates)
        return {int(i): float(s) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0}

    def _cosine(self, embedding: np.ndarray, vec_id: int) -> float:
        for _, vectors in self.catalogue.embeddings([vec_id]):
            return float(vectors[0] @ embedding)
        return 0.0

    def _describe(self, kept: list[CandidateScore], exact: set[int], query_size: tuple[int, int]) -> list[Match]:
        """Matches with their verdict and transform read-out; unrelated candidates are left out."""
        records = self.catalogue.records(c.vec_id for c in kept)
        thresholds = VerdictThresholds.from_settings(self.settings)
        matches = []
        for c in kept:
            record = records.get(c.vec_id)
            if record is None:  # removed while we were ranking
                continue
            is_exact = c.vec_id in exact
            readout = (
                None
                if c.homography is None
                else read_transform(c.homography, query_size, (record.width, record.height))
            )
            verdict = classify(
                exact=is_exact,
                embedding=c.embedding,
                inliers=c.orb_inliers if readout is not None else 0,
                perspective=readout.perspective if readout is not None else None,
                thresholds=thresholds,
            )
            if verdict is None:
                continue
            matches.append(
                Match(
                    id=record.entry_id,
                    url=record.url,
                    original_url=record.location if record.is_remote else f"/api/images/{record.sha256}/original",
                    sha256=record.sha256,
                    score=1.0 if is_exact else round(c.fused, 4),
                    scores=ComponentScores(
                        embedding=round(c.embedding, 4),
                        ssim=round(c.ssim, 4),
                        orb=round(c.orb, 4),
                        orb_inliers=c.orb_inliers,
                    ),
                    exact=is_exact,
                    verdict=verdict,
                    transform=None if readout is None else transform_info(readout),
                    thumbnail_url=f"/api/images/{record.sha256}/thumbnail",
                    metadata=record.metadata,
                )
            )
        return matches
