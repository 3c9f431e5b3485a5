"""Candidates from local features: every gallery image's strongest ORB descriptors in one FAISS binary index.

The global embedding finds the same *picture*, but a phone photo of a small, tilted, glared cover among
clutter is far from its scan in embedding space (on a real set only ~half of the relevant images were in the
embedding's top 50). Local descriptors survive that: each query descriptor looks up its nearest gallery
descriptors (Hamming, on a prefix of the 256-bit ORB code) and each gallery image gets one vote per query
descriptor that found one of its own. Images with many votes are the candidates geometric verification then
checks, merged with the embedding's.

Derived data only: the descriptors come from the ORB blobs stored in the catalogue at ingest, so the index is
rebuilt from the catalogue at start (like the vector index after ``reconcile``) and never persisted on its own.
Memory is ``per_image * (code_bytes + 8)`` bytes per image (FAISS keeps an int64 id per code).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pictrace.features.orb import OrbFeatures

KP_BITS = 14  # a descriptor's id is vec_id << KP_BITS | keypoint index (ORB_FEATURES is at most 10,000)
_KP_MASK = (1 << KP_BITS) - 1


def _stable_sample(codes: np.ndarray, size: int) -> np.ndarray:
    """Row numbers of a pseudo-random sample, in an order, that depend on the codes only, not on their order.

    Concurrent fetches commit images in a different order on every run; a sample drawn by position then
    learns different lists, and the same gallery ranked differently from run to run (measured: mAP moved by
    0.002). Ranking rows by a hash of their bytes picks the same codes whatever the order.
    """
    if len(codes) <= size:
        return np.arange(len(codes))
    words = np.ascontiguousarray(codes).view(np.uint8).reshape(len(codes), -1)
    digest = np.zeros(len(codes), dtype=np.uint64)
    for column in range(words.shape[1]):  # FNV-1a over the bytes of each code
        digest = (digest ^ words[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
    chosen = np.argpartition(digest, size - 1)[:size]
    return chosen[np.argsort(digest[chosen], kind="stable")]  # in digest order too: k-means seeds by position


@dataclass(frozen=True)
class LocalIndexParams:
    per_image: int  # strongest descriptors of each gallery image that are indexed
    code_bytes: int  # prefix of each 32-byte ORB descriptor that is indexed
    knn: int  # neighbours looked up per query descriptor
    max_distance: int  # Hamming distance (on the prefix) beyond which a neighbour is no vote
    nprobe: int  # inverted lists visited per query descriptor (IVF only)
    flat_below: int = 50_000  # exact search is fast enough below this many descriptors, and needs no training


@dataclass(frozen=True)
class Votes:
    """Per gallery image: how many query descriptors found one of its descriptors, and which ones.

    The pairs behind the votes (query descriptor ``rows[k]`` found keypoint ``keypoints[k]`` of image
    ``owners[k]``, the nearest one where it found several) are tentative matches: a homography most of them
    agree on is cheap to look for and says whether an image deserves the full ORB check (ranking.worth_verifying).
    """

    counts: dict[int, int]
    owners: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))

    def top(self, n: int, minimum: int = 1) -> list[int]:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [vec_id for vec_id, count in ranked[:n] if count >= minimum]

    def pairs(self, vec_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, keypoints of ``vec_id``) of the votes it got."""
        lo, hi = np.searchsorted(self.owners, [vec_id, vec_id + 1])
        return self.rows[lo:hi], self.keypoints[lo:hi]


class LocalIndex:
    """Thread-safe: adds, removals and searches take one lock (FAISS crashed here on concurrent add+search)."""

    def __init__(self, params: LocalIndexParams) -> None:
        import faiss

        self.params = params
        self._bits = params.code_bytes * 8
        self._index: faiss.IndexBinary = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self._bits))
        self._quantizer: faiss.IndexBinary | None = None
        self._trained_on = 0  # codes the inverted file's lists were learned from (0: exact flat index)
        self._held: set[int] = set()  # vec_ids applied: adds and removes are idempotent (replicas replay some)
        self._lock = threading.Lock()

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
        """All images at once: an inverted file (binary k-means on the gallery's own codes) once big enough."""
        import faiss

        index = cls(params)
        all_ids, all_codes = [], []
        for vec_id, blob in features:
            if vec_id in index._held:
                continue
            index._held.add(vec_id)
            ids, codes = index._codes(vec_id, OrbFeatures.from_bytes(blob))
            all_ids.append(ids)
            all_codes.append(codes)
        if not all_ids:
            return index
        ids = np.concatenate(all_ids)
        codes = np.ascontiguousarray(np.concatenate(all_codes))
        if len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1])):  # the catalogue yields them sorted already
            by_id = np.argsort(ids, kind="stable")  # one order for one gallery: equal distances tie the same way
            ids, codes = ids[by_id], np.ascontiguousarray(codes[by_id])
        if len(ids) >= params.flat_below:
            # ~4*sqrt(n) lists: a few hundred codes per list, the usual IVF balance of probing vs scanning.
            nlist = int(min(65536, max(64, 4 * math.sqrt(len(ids)))))
            sample = codes[_stable_sample(codes, 64 * nlist)]
            quantizer = faiss.IndexBinaryFlat(index._bits)
            ivf = faiss.IndexBinaryIVF(quantizer, index._bits, nlist)
            ivf.train(np.ascontiguousarray(sample))
            ivf.nprobe = params.nprobe
            index._index, index._quantizer, index._trained_on = ivf, quantizer, len(ids)
        index._index.add_with_ids(codes, ids)
        return index

    def needs_training(self, growth: float = 2.0) -> bool:
        """True once the gallery outgrew what the lists were learned from by ``growth`` (or the exact index
        got slow)."""
        n = len(self)
        return n >= self.params.flat_below and n >= growth * self._trained_on

    def replace_with(self, other: LocalIndex) -> None:
        """Swap in a rebuilt index (same object, so the searcher holding this one sees the new lists)."""
        with self._lock:
            self._index, self._quantizer, self._trained_on = other._index, other._quantizer, other._trained_on
            self._held = other._held

    def add(self, vec_id: int, orb: OrbFeatures) -> None:
        """Index an image's codes; an image already held is left as it is."""
        ids, codes = self._codes(vec_id, orb)
        with self._lock:
            if vec_id in self._held:
                return
            self._held.add(vec_id)
            if len(ids):
                self._index.add_with_ids(codes, ids)

    def remove(self, vec_ids: Iterable[int]) -> int:
        """Drop images' codes in one pass over the index (each pass scans every code). Returns images dropped."""
        import faiss

        with self._lock:
            gone = [int(v) for v in vec_ids if int(v) in self._held]
            if not gone:
                return 0
            self._held.difference_update(gone)
            codes = np.arange(self.params.per_image, dtype=np.int64)
            ids = np.ascontiguousarray(((np.array(gone, dtype=np.int64) << KP_BITS)[:, None] | codes).ravel())
            self._index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
            return len(gone)

    def vote(self, query: OrbFeatures) -> Votes:
        """One vote per (query descriptor, gallery image) pair whose codes are within ``max_distance``."""
        if len(query) == 0 or len(self) == 0:
            return Votes({})
        codes = np.ascontiguousarray(query.descriptors[:, : self.params.code_bytes])
        with self._lock:
            dist, ids = self._index.search(codes, self.params.knn)
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
