"""The search pipeline, plain Python shared by the web app, the CLI, the eval command and the tests.

decode → sha256 (exact hit?) → embed, and alongside it ORB → the images with most local-descriptor votes,
screened on the votes' own pairs → ∪ the K nearest vectors → verify the promising ones (ORB+RANSAC) → add the
stored links of the best (pictrace/graph.py) → SSIM on the best few → fuse → top-k.

The embedding runs on a side thread while the query's ORB features, votes and screen run on the worker's, and
the two threads then share the candidates' full checks and SSIM: onnxruntime's two threads embed one image only
~1.4x faster than one, so the local-feature half, which needs no embedding, fits largely beside it
(docs/quality.md, "Two threads for one query").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from pictrace.config import Settings
from pictrace.decode import DecodedImage, decode_image
from pictrace.features.embed import Embedder
from pictrace.features.extract import orb_of
from pictrace.features.hashing import pixel_sha256, sha256_hex
from pictrace.features.orb import OrbFeatures
from pictrace.features.ssim import SsimReference, gray256
from pictrace.graph import expand
from pictrace.index import VectorIndex
from pictrace.local_index import LocalIndex, Votes
from pictrace.mirror import mirror_pass, mirrored_orb, needs_mirror
from pictrace.ranking import (
    CandidateScore,
    GeometricFit,
    fit_geometry,
    identical_fit,
    nearest_by_embedding,
    scored,
    screened,
    with_ssim,
)
from pictrace.schemas import ComponentScores, Match, QueryInfo, SearchResult
from pictrace.store import Catalogue
from pictrace.transform import read_transform, transform_info
from pictrace.verdict import VerdictThresholds, classify
from pictrace.work import SideJob, SideThread, map_serial

T = TypeVar("T")
R = TypeVar("R")


class Searcher:
    def __init__(
        self,
        catalogue: Catalogue,
        index: VectorIndex,
        embedder: Embedder,
        settings: Settings,
        local: LocalIndex | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.index = index
        self.embedder = embedder
        self.settings = settings
        self.local = local
        self._side = SideThread() if settings.embed_alongside else None

    def close(self) -> None:
        if self._side is not None:
            self._side.shutdown()

    def search_bytes(self, data: bytes, top_k: int | None = None) -> SearchResult:
        """Search with an encoded image (upload, download or file). Raises the decode errors on bad input."""
        return self._search_bytes(data, top_k)[0]

    def search_image(
        self, image: DecodedImage, sha256: str, top_k: int | None = None, started: float | None = None
    ) -> SearchResult:
        return self._search(image, sha256, top_k, started)[0]

    def search_ranked(self, data: bytes, top_k: int | None = None) -> tuple[SearchResult, list[str]]:
        """The answer a client gets, plus the ids of *every* candidate ranked, shown or not (for ``eval``:
        an image the verdicts hide still counts where it was ranked, as with any ranked-list metric)."""
        result, ranked = self._search_bytes(data, top_k)
        records = self.catalogue.records(ranked)
        return result, [records[v].entry_id for v in ranked if v in records]

    def _search_bytes(self, data: bytes, top_k: int | None) -> tuple[SearchResult, list[int]]:
        started = time.perf_counter()
        image = decode_image(data, max_pixels=self.settings.max_pixels)
        return self._search(image, sha256_hex(data), top_k, started)

    def _search(
        self, image: DecodedImage, sha256: str, top_k: int | None, started: float | None
    ) -> tuple[SearchResult, list[int]]:
        started = time.perf_counter() if started is None else started
        top_k = top_k or self.settings.top_k
        rgb = image.rgb
        # The side thread's queue, in order: pixel hash, embedding, SSIM reference; the worker meanwhile does
        # the local-feature half, which needs none of them but the hash (exact matches skip the full check).
        pixels_job = SideJob(lambda: pixel_sha256(rgb), self._side)
        embedding_job = SideJob(lambda: self.embedder.embed([rgb])[0], self._side)
        gray_job = SideJob(lambda: SsimReference(gray256(rgb)), self._side)
        query = orb_of(rgb, self.settings)
        votes = self._votes(query)
        voted = votes.top(self.settings.local_candidates, self.settings.local_min_votes)
        exact = self.catalogue.vec_ids_by_hash(sha256, pixels_job.result())
        exact_set = set(exact)
        orbs = self._orbs_of([*exact, *voted])
        fits = {v: identical_fit(orbs[v]) for v in exact if v in orbs}
        fits |= self._fit(query, orbs, self._screened(query, orbs, votes) - exact_set)
        embedding = embedding_job.result()
        cosines = self._nearest(embedding)
        self._add_cosines(cosines, embedding, [*exact, *voted])
        more = self._orbs_of(v for v in cosines if v not in orbs)
        orbs |= more
        checked = self._screened(query, more, votes) | nearest_by_embedding(cosines, orbs, self.settings)
        fits |= self._fit(query, orbs, checked - fits.keys())
        verified = [
            scored(v, cosines[v], fits.get(v), self.settings, votes.counts.get(v, 0)) for v in cosines if v in orbs
        ]

        def order(c: CandidateScore) -> tuple[bool, float]:
            return (c.vec_id in exact_set, c.fused)

        def cosine_of(vec_ids: list[int]) -> dict[int, float]:
            self._add_cosines(cosines, embedding, vec_ids)
            return {v: cosines[v] for v in vec_ids if v in cosines}

        verified.sort(key=order, reverse=True)
        verified = expand(verified, exact_set, self.catalogue, self.settings, cosine_of)
        verified.sort(key=order, reverse=True)
        # The results shown (and their verdicts) get SSIM and the mirror check; the other candidates keep
        # their provisional score and stay in the list.
        n_ssim = max(self.settings.ssim_shortlist, top_k)
        best = verified[:n_ssim]
        stored = self.catalogue.rerank_features(c.vec_id for c in best)
        # A candidate the mirror pass will re-match needs the mirrored query's ORB (~12 ms): on the side thread,
        # beside the SSIM (which needs nothing the mirror pass changes).
        mirror_job = (
            SideJob(lambda: mirrored_orb(rgb, self.settings), self._side)
            if needs_mirror(best, stored, self.settings)
            else None
        )
        gray = gray_job.result()
        shortlist = self._map(
            lambda c: with_ssim(gray, c, stored[c.vec_id], self.settings), [c for c in best if c.vec_id in stored]
        )
        shortlist = mirror_pass(
            rgb,
            shortlist,
            stored,
            self.settings,
            mirrored=None if mirror_job is None else mirror_job.result,
            map_each=self._map,
        )
        ranked = sorted(shortlist + verified[n_ssim:], key=order, reverse=True)
        kept = [c for c in ranked if c.vec_id in exact_set or c.fused >= self.settings.min_score]
        result = SearchResult(
            query=QueryInfo(sha256=sha256, width=image.width, height=image.height),
            results=self._describe(kept, exact_set, (image.width, image.height), top_k),
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return result, [c.vec_id for c in kept]

    def _screened(self, query: OrbFeatures, orbs: dict[int, OrbFeatures], votes: Votes) -> set[int]:
        """The candidates worth the full check by their votes (all of them when there are no votes to screen)."""
        if self.local is None or self.settings.local_candidates == 0:
            return set(orbs)
        return screened(query, orbs, votes, self.settings, self._map)

    def _fit(self, query: OrbFeatures, orbs: dict[int, OrbFeatures], vec_ids: set[int]) -> dict[int, GeometricFit]:
        """The full check of these candidates, shared with the side thread once it is free."""
        todo = sorted(v for v in vec_ids if v in orbs)

        def fit(vec_id: int) -> GeometricFit:
            return fit_geometry(query, orbs[vec_id], self.settings)

        return dict(zip(todo, self._map(fit, todo), strict=True))

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, shared with the side thread when there is one."""
        return map_serial(fn, items) if self._side is None else self._side.map(fn, items)

    def _orbs_of(self, vec_ids: Iterable[int]) -> dict[int, OrbFeatures]:
        return {v: OrbFeatures.from_bytes(blob) for v, blob in self.catalogue.orb_blobs_of(vec_ids)}

    def _nearest(self, embedding: np.ndarray) -> dict[int, float]:
        scores, ids = self.index.search(embedding[None, :], self.settings.candidates)
        return {int(i): float(s) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0}

    def _votes(self, query: OrbFeatures) -> Votes:
        """Which images the query's local descriptors point to (candidates the embedding alone misses)."""
        if self.local is None or self.settings.local_candidates == 0:
            return Votes({})
        return self.local.vote(query, self._map)

    def _add_cosines(self, cosines: dict[int, float], embedding: np.ndarray, vec_ids: list[int]) -> None:
        missing = [v for v in vec_ids if v not in cosines]
        for ids, vectors in self.catalogue.embeddings(missing):
            for vec_id, score in zip(ids.tolist(), (vectors @ embedding).tolist(), strict=True):
                cosines[int(vec_id)] = float(score)

    def _describe(
        self, kept: list[CandidateScore], exact: set[int], query_size: tuple[int, int], limit: int
    ) -> list[Match]:
        """The first ``limit`` matches with their verdict and transform read-out; unrelated candidates are left out."""
        records = self.catalogue.records({v for c in kept for v in (c.vec_id, c.via) if v is not None})
        thresholds = VerdictThresholds.from_settings(self.settings)
        matches: list[Match] = []
        for c in kept:
            if len(matches) == limit:
                break
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
                linked=c.via is not None,
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
                        votes=c.votes,
                    ),
                    exact=is_exact,
                    verdict=verdict,
                    transform=None if readout is None else transform_info(readout),
                    via=None if c.via is None or c.via not in records else records[c.via].entry_id,
                    thumbnail_url=f"/api/images/{record.sha256}/thumbnail",
                    metadata=record.metadata,
                )
            )
        return matches
