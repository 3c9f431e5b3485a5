"""Candidates from local features: every gallery image's strongest ORB descriptors in one FAISS binary index.

The global embedding finds the same *picture*, but a phone photo of a small, tilted, glared cover among
clutter is far from its scan in embedding space (on a real set only ~half of the relevant images were in the
embedding's top 50). Local descriptors survive that: each query descriptor looks up its nearest gallery
descriptors (Hamming, on a prefix of the 256-bit ORB code) and each gallery image gets one vote per query
descriptor that found one of its own. Images with many votes are the candidates geometric verification then
checks, merged with the embedding's.

Derived data only: the descriptors come from the ORB blobs stored in the catalogue at ingest. The index is
saved to the data dir (``local.faiss``, written atomically like ``vectors.faiss``) so that a start reopens it in
seconds instead of relearning its lists (an hour and more at 100k images before the learning was bounded); the
file records the vec_ids it holds and the parameters it was built with, and a start applies the catalogue's
adds and deletes since. A missing, stale (other parameters, another catalogue) or corrupt file is rebuilt from
the catalogue: it costs time, never results.
Memory is ``per_image * (code_bytes + 8)`` bytes per image (FAISS keeps an int64 id per code).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pictrace.features.orb import OrbFeatures
from pictrace.indexes.local.file import LocalIndexCorruptError, read_local, write_local
from pictrace.indexes.local.lists import (
    list_count,
    query_cells,
    stable_sample,
    top_cell_count,
    train_two_level,
    two_level_quantizer,
)
from pictrace.indexes.local.params import LocalIndexParams
from pictrace.indexes.local.votes import Votes
from pictrace.indexes.lock import ReadWriteLock
from pictrace.indexes.storage import atomic_write
from pictrace.tuning import KEYPOINT_BITS

if TYPE_CHECKING:  # the schedule's module imports the search, which imports this one
    from pictrace.search.schedule import MapEach

log = logging.getLogger(__name__)

ADD_CELLS = 2  # top cells whose lists a code being added is compared with (vote pairs at 10k: 0.84 with 1, 0.89)
CHUNK_CODES = 1 << 22  # codes assigned and added at a time while building (64 MB of codes)
VOTE_CHUNK = 128  # query descriptors looked up at a time, so that two threads can share one query's lookup

KP_BITS = KEYPOINT_BITS  # a descriptor's id is vec_id << KP_BITS | keypoint index (orb.features bounds it)
_KP_MASK = (1 << KP_BITS) - 1


class LocalIndex:
    """Thread-safe: searches share a lock that adds, removals and swaps take alone (FAISS crashed here on
    concurrent add+search; concurrent searches are safe)."""

    def __init__(self, params: LocalIndexParams) -> None:
        import faiss

        self.params = params
        self._bits = params.code_bytes * 8
        self._index: faiss.IndexBinary = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self._bits))
        self._quantizer: faiss.IndexBinary | None = None  # the IVF's (kept alive: FAISS does not own it)
        self._coarse: faiss.IndexBinaryIVF | None = None  # the two-level quantizer (IVF only; ``_index`` owns it)
        self._query_cells: Any = None  # cells over an exact assignment's lists, searched by queries (lists.query_cells)
        self._trained_on = 0  # codes the inverted file's lists were learned from (0: exact flat index)
        self._held: set[int] = set()  # vec_ids applied: adds and removes are idempotent (replicas replay some)
        self._lock = ReadWriteLock()
        self._changes = 0  # adds, removes and swaps so far; ``save`` skips writing when none since the last
        self._saved_at: tuple[Path, int] | None = None  # where and at which change count it was last saved

    @property
    def is_inverted_file(self) -> bool:
        return self._trained_on > 0

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, vec_id: object) -> bool:
        return vec_id in self._held

    @property
    def bytes_per_image(self) -> int:
        return self.params.per_image * (self.params.code_bytes + 8)

    def _codes(self, vec_id: int, orb: OrbFeatures) -> tuple[np.ndarray, np.ndarray]:
        n = min(len(orb), self.params.per_image)
        codes = np.ascontiguousarray(orb.descriptors[:n, : self.params.code_bytes])
        ids = (np.int64(vec_id) << KP_BITS) | np.arange(n, dtype=np.int64)
        return ids, codes

    @classmethod
    def build(cls, params: LocalIndexParams, features: Iterable[tuple[int, bytes]]) -> LocalIndex:
        """All images at once: an inverted file (binary k-means on the gallery's own codes) once big enough.

        The codes are kept in chunks (ids are made when added), sampled without a copy, then assigned and added
        a chunk at a time, each freed once added: at 1M images the codes (8 GB) and the index (12 GB) are never
        both whole in memory.
        """
        import faiss

        index = cls(params)
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (vec_ids, code counts, codes) per chunk
        vec_ids: list[int] = []
        counts: list[int] = []
        part: list[np.ndarray] = []
        in_order, in_part = True, 0
        for vec_id, blob in features:
            if vec_id in index._held:
                continue
            index._held.add(vec_id)
            in_order = in_order and (not vec_ids or vec_id > vec_ids[-1])
            codes = index._codes(vec_id, OrbFeatures.from_bytes(blob))[1]
            vec_ids.append(vec_id)
            counts.append(len(codes))
            part.append(codes)
            in_part += len(codes)
            if in_part >= CHUNK_CODES:
                chunks.append((np.array(vec_ids, dtype=np.int64), np.array(counts), np.concatenate(part)))
                vec_ids, counts, part, in_part = [], [], [], 0
        if vec_ids:
            chunks.append((np.array(vec_ids, dtype=np.int64), np.array(counts), np.concatenate(part)))
        total = sum(len(codes) for _, _, codes in chunks)
        if not total:
            return index
        if not in_order:  # the catalogue yields them sorted already
            ids, counts_, codes = (np.concatenate(column) for column in zip(*chunks, strict=True))
            by_id = np.argsort(ids, kind="stable")  # one order for one gallery: equal distances tie the same way
            starts = np.concatenate([[0], np.cumsum(counts_)])
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in by_id])
            chunks = [(ids[by_id], counts_[by_id], np.ascontiguousarray(codes[rows]))]
        if total >= params.flat_below:
            nlist = list_count(total, params.max_lists)
            started = time.perf_counter()
            sample = stable_sample((c for _, _, c in chunks), min(64 * nlist, max(params.train_max, nlist)))
            top, subs, offsets = train_two_level(sample, nlist, params.cell_lists, params.train_iterations)
            log.info("local-feature index: %d lists under %d top cells learned from %d codes in %.1f s",
                     len(subs), len(top), len(sample), time.perf_counter() - started)
            coarse = two_level_quantizer(top, subs, offsets)
            ivf = faiss.IndexBinaryIVF(coarse, index._bits, len(subs))
            ivf.train(np.ascontiguousarray(sample[:1]))  # the quantizer holds nlist centres: nothing to learn
            ivf.nprobe, coarse.nprobe = params.nprobe, params.top_probe
            index._index, index._quantizer, index._coarse, index._trained_on = ivf, coarse, coarse, total
            index._query_cells = index._cells_for_queries()
        started = time.perf_counter()
        while chunks:
            chunk_ids, chunk_counts, codes = chunks.pop(0)
            keypoints = np.arange(len(codes)) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
            ids = (np.repeat(chunk_ids, chunk_counts) << KP_BITS) | keypoints
            index._add_codes(ids, np.ascontiguousarray(codes))
        log.info("local-feature index: %d codes added in %.1f s", total, time.perf_counter() - started)
        return index

    def _add_codes(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Into the exact index, or into the lists the two-level quantizer picks (FAISS's own add would compare
        every code with every list centre)."""
        import faiss

        if self._coarse is None:
            self._index.add_with_ids(codes, ids)
            return
        nearest = faiss.SearchParametersIVF()
        nearest.nprobe = ADD_CELLS
        found = self._coarse.search(codes, 1, params=nearest)[1]
        lists = np.ascontiguousarray(found.ravel())
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        ivf: Any = self._index
        ivf.add_core(len(ids), faiss.swig_ptr(codes), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    @classmethod
    def open(cls, path: Path, params: LocalIndexParams, catalogue_id: str) -> LocalIndex | None:
        """The index saved at ``path``; None when it was built with other parameters or for another catalogue.

        Raises LocalIndexCorruptError when the file cannot be read. Query-time parameters (knn, max_distance,
        nprobe) are today's, whatever they were when it was saved.
        """
        import faiss

        try:
            with path.open("rb") as handle:
                header, held, stored = read_local(handle)
            trained_on = int(header["trained_on"])
            built_with, built_for = header["params"], header["catalogue"]
            coarse = None
            if isinstance(stored, faiss.IndexBinaryIVF):
                coarse = faiss.downcast_IndexBinary(stored.quantizer)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            if isinstance(exc, ValueError) and "older format" in str(exc):
                log.info("local-feature index %s is in an older format", path)
                return None  # stale, not damaged: rebuilt like one built with other parameters
            raise LocalIndexCorruptError(f"local-feature index {path} is unreadable ({exc})") from exc
        if built_with != params.structure() or built_for != catalogue_id:
            return None
        index = cls(params)
        if (coarse is not None) != (trained_on > 0) or not isinstance(coarse, faiss.IndexBinaryIVF | None):
            raise LocalIndexCorruptError(f"local-feature index {path}: its structure does not match its header")
        if coarse is not None:
            stored.nprobe, coarse.nprobe = params.nprobe, params.top_probe  # today's, not the file's
        index._index, index._coarse, index._trained_on = stored, coarse, trained_on
        index._query_cells = index._cells_for_queries()
        index._held = set(held.tolist())
        index._saved_at = (path, index._changes)
        return index

    def save(self, path: Path, catalogue_id: str) -> bool:
        """Write the index to ``path`` atomically, unless nothing changed since it was saved there or read from
        there. Returns whether it wrote. Adds and removes wait meanwhile (seconds at 100k images); searches go on."""
        with self._lock.read():
            if self._saved_at == (path, self._changes):
                return False
            held = np.array(sorted(self._held), dtype=np.int64)
            header = {
                "params": self.params.structure(),
                "catalogue": catalogue_id,
                "trained_on": self._trained_on,
                "held": len(held),
                "codes": int(self._index.ntotal),
            }
            stored = self._index
            atomic_write(path, lambda handle: write_local(handle, header, held, stored))
            self._saved_at = (path, self._changes)
        return True

    def held_ids(self) -> np.ndarray:
        """The vec_ids whose codes the index holds, sorted."""
        with self._lock.read():
            return np.array(sorted(self._held), dtype=np.int64)

    def needs_training(self) -> bool:
        """The one rule for when the lists are learned: first when the exact scan reaches ``flat_below`` codes,
        then again each time the gallery has grown ``relearn_growth``-fold (4x) since they were learned.

        The lists are ~4*sqrt(codes) (``list_count``): at 4x the codes a gallery calls for twice the lists it
        has, each list holds twice the codes it was sized for, and a lookup scans twice as many. Learning costs
        a bounded k-means on at most ``train_max`` codes plus one pass that files every code, so relearning at
        every 4x growth files each code 4/3 times over a gallery's life (every 2x: twice; docs/scaling.md,
        "Ingest speed"). A gallery 1-4x the size of the codes its lists were learned from loses no votes to
        them: measured on both evaluation sets."""
        n = len(self)
        return n >= self.params.flat_below and n >= self.params.relearn_growth * self._trained_on

    def replace_with(self, other: LocalIndex) -> None:
        """Swap in a rebuilt index (same object, so the searcher holding this one sees the new lists)."""
        with self._lock.write():
            self._index, self._quantizer, self._trained_on = other._index, other._quantizer, other._trained_on
            self._coarse, self._query_cells = other._coarse, other._query_cells
            self._held = other._held
            self._changes += 1

    def add(self, vec_id: int, orb: OrbFeatures) -> None:
        """Index an image's codes; an image already held is left as it is."""
        ids, codes = self._codes(vec_id, orb)
        with self._lock.write():
            if vec_id in self._held:
                return
            self._held.add(vec_id)
            self._changes += 1
            if len(ids):
                self._add_codes(ids, codes)

    def remove(self, vec_ids: Iterable[int]) -> int:
        """Drop images' codes in one pass over the index (each pass scans every code). Returns images dropped."""
        import faiss

        with self._lock.write():
            gone = [int(v) for v in vec_ids if int(v) in self._held]
            if not gone:
                return 0
            self._held.difference_update(gone)
            self._changes += 1
            codes = np.arange(self.params.per_image, dtype=np.int64)
            ids = np.ascontiguousarray(((np.array(gone, dtype=np.int64) << KP_BITS)[:, None] | codes).ravel())
            self._index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
            return len(gone)

    def _cells_for_queries(self) -> Any:
        """Cells over the lists for queries to search, where every code was filed in its nearest list (one top
        cell) and the lists are many enough (``query_cell_lists``); None: queries compare every centre."""
        import faiss

        coarse, cell_lists = self._coarse, self.params.query_cell_lists
        if cell_lists is None or coarse is None or coarse.nlist != 1:
            return None
        n = coarse.invlists.list_size(0)
        if top_cell_count(n, cell_lists) <= self.params.top_probe:
            return None  # a query would search every cell: the exact assignment with extra steps
        codes = faiss.rev_swig_ptr(coarse.invlists.get_codes(0), n * coarse.code_size)
        lists = faiss.rev_swig_ptr(coarse.invlists.get_ids(0), n)
        centres = np.empty((n, coarse.code_size), dtype=np.uint8)
        centres[lists] = np.asarray(codes).reshape(n, coarse.code_size)  # row i: the centre of list i
        cells = query_cells(centres, cell_lists, self.params.train_iterations)
        if cells is not None:
            cells.nprobe = self.params.top_probe
        return cells

    def _lookup_params(self) -> Any:
        """The lookup's parameters: ``nprobe``, and ``max_codes`` where ``scan_budget`` bounds the codes scanned
        (None for an exact index)."""
        import faiss

        if not self.is_inverted_file:
            return None
        ivf: Any = self._index
        params = faiss.SearchParametersIVF()
        params.nprobe = self.params.nprobe
        if self.params.scan_budget is not None:
            params.max_codes = max(1, round(self.params.scan_budget * self.params.nprobe * ivf.ntotal / ivf.nlist))
        return params

    def _search(self, codes: np.ndarray, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of each code's ``knn`` nearest; with query cells, among the lists they find nearest."""
        import faiss

        cells = self._query_cells
        if cells is None:
            dist, ids = self._index.search(codes, self.params.knn, params=params)
            return dist, ids
        list_dist, lists = cells.search(codes, self.params.nprobe)
        list_dist, lists = np.ascontiguousarray(list_dist), np.ascontiguousarray(lists)
        n, k = len(codes), self.params.knn
        dist, ids = np.empty((n, k), dtype=np.int32), np.empty((n, k), dtype=np.int64)
        ivf: Any = self._index
        ivf.search_preassigned_c(
            n, faiss.swig_ptr(codes), k, faiss.swig_ptr(lists), faiss.swig_ptr(list_dist),
            faiss.swig_ptr(dist), faiss.swig_ptr(ids), False, params,
        )
        return dist, ids

    def vote(self, query: OrbFeatures, map_each: MapEach | None = None) -> Votes:
        """One vote per (query descriptor, gallery image) pair whose codes are within ``max_distance``.

        The descriptors are looked up ``VOTE_CHUNK`` at a time through ``map_each``: at 100k images the lookup
        takes ~145 ms on one thread, long after the search's side thread has finished the embedding and could
        take half of it (``SideThread.map``; None: all on this thread). Each descriptor's neighbours are the
        same either way.
        """
        if len(query) == 0 or len(self) == 0:
            return Votes({})
        codes = np.ascontiguousarray(query.descriptors[:, : self.params.code_bytes])
        chunks = [codes[i : i + VOTE_CHUNK] for i in range(0, len(codes), VOTE_CHUNK)]
        with self._lock.read():  # held for all chunks, whichever thread looks them up
            params = self._lookup_params()

            def lookup(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return self._search(part, params)

            found_parts = [lookup(part) for part in chunks] if map_each is None else map_each(lookup, chunks)
        dist = np.vstack([d for d, _ in found_parts])  # an IVF's lists: its two-level quantizer's
        ids = np.vstack([i for _, i in found_parts])
        ok = (ids >= 0) & (dist <= self.params.max_distance)
        rows = np.nonzero(ok)[0].astype(np.int64)
        found = ids[ok]  # row by row, nearest first
        # One vote per (image, query descriptor); np.unique keeps the first, i.e. nearest, of each pair.
        keys, first = np.unique((found >> KP_BITS) << KP_BITS | rows, return_index=True)
        owners = keys >> KP_BITS
        images, counts = np.unique(owners, return_counts=True)
        return Votes(
            {int(v): int(c) for v, c in zip(images, counts, strict=True)},
            owners=owners,
            rows=(keys & _KP_MASK).astype(np.intp),
            keypoints=(found[first] & _KP_MASK).astype(np.intp),
        )
