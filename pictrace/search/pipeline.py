"""The search pipeline, plain Python shared by the web app, the CLI, the eval command and the tests.

decode → candidates (exact hash, local-descriptor votes) → verify them (screen, geometric fit) → candidates
(nearest vectors) → verify those → expand (match graph) → rerank (SSIM, mirror check) → present (verdicts,
transform read-out). The stages are pictrace/search/*.py, functions over plain data; where their work runs is
pictrace/search/schedule.py's business, and what they read from the catalogue is read once (reads.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import astuple

import numpy as np

from pictrace.config import Settings
from pictrace.decode import DecodedImage, decode_image
from pictrace.features.embed import Embedder
from pictrace.features.extract import orb_of
from pictrace.features.hashing import sha256_hex
from pictrace.indexes.local import LocalIndex
from pictrace.indexes.vector import VectorIndex
from pictrace.schemas import QueryInfo, SearchResult
from pictrace.search import candidates, present, rerank
from pictrace.search.expand import expand
from pictrace.search.reads import QueryReads
from pictrace.search.schedule import Schedule
from pictrace.search.verify import Checks, scores, verify
from pictrace.store import CatalogueStore
from pictrace.tuning import Tuning


class Searcher:
    def __init__(
        self,
        catalogue: CatalogueStore,
        index: VectorIndex,
        embedder: Embedder,
        settings: Settings,
        local: LocalIndex,
        tuning: Tuning | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        """``schedule``: where the work runs (default: both threads if ``embed_alongside``); closed by ``close``."""
        self.catalogue = catalogue
        self.index = index
        self.embedder = embedder
        self.settings = settings
        self.local = local
        self.tuning = tuning or Tuning()
        self._schedule = schedule or Schedule.for_tuning(self.tuning)

    def close(self) -> None:
        self._schedule.close()

    def search_bytes(self, data: bytes, top_k: int | None = None) -> SearchResult:
        """Search with an encoded image (upload, download or file). Raises the decode errors on bad input."""
        return self.search_ranked(data, top_k)[0]

    def search_ranked(self, data: bytes, top_k: int | None = None) -> tuple[SearchResult, list[str]]:
        """The answer a client gets, plus the ids of *every* candidate ranked, shown or not (for ``eval``:
        an image the verdicts hide still counts where it was ranked, as with any ranked-list metric)."""
        started = time.perf_counter()
        image = decode_image(
            data, max_pixels=self.settings.max_pixels, draft_min_side=self.tuning.decoding.draft_min_side
        )
        return self._search(image, sha256_hex(data), top_k or self.settings.top_k, started)

    def _search(
        self, image: DecodedImage, sha256: str, top_k: int, started: float
    ) -> tuple[SearchResult, list[str]]:
        t, run, reads = self.tuning, self._schedule, QueryReads(self.catalogue)
        jobs = run.query_jobs(image.rgb, self.embedder, t, image.scale)  # beside: pixel hash, embedding, SSIM ref.
        query = orb_of(image.rgb, t, image.scale)
        # candidates found without the embedding, verified while it is computed
        votes = candidates.votes_for(query, self.local, t, run.map)
        found = candidates.local_candidates(self.catalogue.vec_ids_by_hash(sha256, jobs.pixel_hash.result()), votes, t)
        checks = verify(query, found, reads.orbs(found.local), Checks(), t, run.map)
        # the nearest vectors join them, and are verified in turn
        # the picture inside the query (a screenshot's) is searched by its own embedding too
        own, inner = jobs.embedding.result(), jobs.inner.result()
        embeddings = own[None, :] if inner is None else np.stack([own, inner.embedding])
        nearest = candidates.nearest(self.index, embeddings, t)
        reads.know_cosines(nearest)
        found = candidates.with_nearest(found, nearest, reads.cosines(embeddings, found.local))
        orbs = reads.orbs(found.cosines)
        checks = verify(query, found, orbs, checks, t, run.map)
        ranked = found.best_first(scores(found, orbs, checks, t))
        # expand through the match graph
        cosine_of = functools.partial(reads.cosines, embeddings)
        ranked = found.best_first(expand(ranked, found.exact, t, links_of=self.catalogue.links_of, cosine_of=cosine_of))
        # rerank the shortlist: SSIM, and the mirrored query's ORB extracted beside it when a candidate needs it
        best, rest = rerank.shortlist(ranked, top_k, t)
        orbs, grays = reads.orbs(c.vec_id for c in best), reads.grays(c.vec_id for c in best)
        mirror = jobs.start_mirrored_orb() if rerank.needs_mirror(best, orbs, t) else None
        best = rerank.with_ssim_all(jobs.ssim_reference.result(), best, grays, t, run.map)
        best = best if mirror is None else rerank.mirror_pass(mirror.result(), best, orbs, t, run.map)
        kept = present.kept(found.best_first(best + rest), found.exact, t)
        # present the first top_k related
        records = reads.records(present.named(kept))
        result = SearchResult(
            query=QueryInfo(
                sha256=sha256,
                width=image.width,
                height=image.height,
                inner_picture=None if inner is None else list(astuple(inner.box.scaled(1.0 / image.scale))),
            ),
            results=present.describe(kept, found.exact, records, (image.width, image.height), top_k, t),
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return result, [records[c.vec_id].entry_id for c in kept if c.vec_id in records]
