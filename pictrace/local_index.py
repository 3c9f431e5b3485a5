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

Learning the lists is bounded whatever the gallery size: a binary k-means (k-majority: Hamming assignment,
each centre the majority bit of its codes) on at most ``train_max`` codes, ``train_iterations`` rounds, at most
``max_lists`` lists. FAISS's own binary k-means runs a float k-means in 128 dimensions, ~25x slower per
(code, centre) pair here than a Hamming scan.

The coarse assignment can be two-level (a k-majority tree), for galleries whose build time matters more than
their vote recall: top cells of ``cell_lists`` (e.g. 1,024) lists each, each cell's lists learned from the
codes of that cell. Comparing every code and every query descriptor with all of up to 65,536 centres makes
the add (~7 h projected at 1M images) and the lookup grow with the lists; with cells a code meets the top
centres and the lists of its 2 nearest cells (2,112 at 65,536 lists), a query descriptor the top centres and
the lists of its ``top_probe`` (8) nearest cells. The quantizer is itself a FAISS binary inverted file (the
lists' centres, filed under their top cell), so FAISS does both levels in one call and saves them inside the
index. The default (65,536 lists per cell: one cell) is the exact scan: a code near a cell's border lands in
a list a query in the next cell misses, which cost vote recall on the benchmark's mix (README, scaling out).
FAISS's binary HNSW over the centres was tried instead and misassigned 22-68 % of the codes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from pictrace.features.orb import OrbFeatures
from pictrace.index.base import ReadWriteLock

if TYPE_CHECKING:
    from pictrace.search.schedule import MapEach

log = logging.getLogger(__name__)

MAGIC = b"PICTRACE-LOCAL-2\n"  # 2: the inverted file's quantizer is two-level; a 1 file is stale, rebuilt
OLDER = b"PICTRACE-LOCAL-"
END = b"PICTRACE-END\n"

TOP_SAMPLE_PER_CELL = 512  # codes per top cell its centres are learned from (the sub-centres use all)
ADD_CELLS = 2  # top cells whose lists a code being added is compared with (vote pairs at 10k: 0.84 with 1, 0.89)
CHUNK_CODES = 1 << 22  # codes assigned and added at a time while building (64 MB of codes)
VOTE_CHUNK = 128  # query descriptors looked up at a time, so that two threads can share one query's lookup

KP_BITS = 14  # a descriptor's id is vec_id << KP_BITS | keypoint index (ORB_FEATURES is at most 10,000)
_KP_MASK = (1 << KP_BITS) - 1


def _digests(codes: np.ndarray) -> np.ndarray:
    """FNV-1a over the bytes of each code."""
    words = np.ascontiguousarray(codes).view(np.uint8).reshape(len(codes), -1)
    digest = np.zeros(len(codes), dtype=np.uint64)
    for column in range(words.shape[1]):
        digest = (digest ^ words[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
    return digest


def stable_sample(chunks: Iterable[np.ndarray], size: int) -> np.ndarray:
    """A pseudo-random sample of the codes in ``chunks``, in an order, that depends on the codes only, not on
    their order or how they are chunked.

    Concurrent fetches commit images in a different order on every run; a sample drawn by position then
    learns different lists, and the same gallery ranked differently from run to run (measured: mAP moved by
    0.002). Ranking codes by a hash of their bytes picks the same codes whatever the order; keeping the
    ``size`` smallest hashes chunk after chunk spares a copy of all codes (8 GB at 1M images). The sample is
    in hash order too: k-means seeds by position.
    """
    kept = np.zeros((0, 0), dtype=np.uint8)
    kept_digest = np.zeros(0, dtype=np.uint64)
    for chunk in chunks:
        pool = np.concatenate([kept, chunk]) if len(kept) else chunk
        digest = np.concatenate([kept_digest, _digests(chunk)])
        if len(pool) > size:
            chosen = np.argpartition(digest, size - 1)[:size]
            pool, digest = pool[chosen], digest[chosen]
        kept, kept_digest = pool, digest
    return np.ascontiguousarray(kept[np.argsort(kept_digest, kind="stable")])


def train_lists(sample: np.ndarray, nlist: int, iterations: int) -> np.ndarray:
    """Binary k-means (k-majority) of ``sample``'s codes into ``nlist`` centres; deterministic for one sample.

    Seeds are the sample's first ``nlist`` rows (``stable_sample`` orders them by a hash of their bytes, so
    the seeds do not depend on the order images arrived in). Each round assigns every code to its nearest
    centre by Hamming distance (FAISS's exact binary scan) and makes each centre the majority bit of its codes;
    a centre that lost all its codes keeps its place. Cost: ``len(sample) * nlist * iterations`` Hamming
    distances.
    """
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.uint8)
    nbits = sample.shape[1] * 8
    centres = sample[:nlist].copy()
    if len(sample) <= nlist:
        return centres
    bits = np.unpackbits(sample, axis=1)
    for _ in range(iterations):
        quantizer = faiss.IndexBinaryFlat(nbits)
        quantizer.add(centres)
        _, nearest = quantizer.search(sample, 1)
        nearest = nearest.ravel()
        sizes = np.bincount(nearest, minlength=nlist)
        order = np.argsort(nearest, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        filled = sizes > 0
        ones = np.add.reduceat(bits[order].astype(np.int32), starts[filled], axis=0)
        updated = centres.copy()
        updated[filled] = np.packbits((2 * ones > sizes[filled, None]).astype(np.uint8), axis=1)
        if np.array_equal(updated, centres):
            break
        centres = updated
    return centres


def list_count(n: int, max_lists: int) -> int:
    """~4*sqrt(n) lists: a few hundred codes per list, the usual IVF balance of probing vs scanning."""
    return int(min(max_lists, max(64, 4 * math.sqrt(n))))


def top_cell_count(nlist: int, cell_lists: int) -> int:
    """Top cells of ``cell_lists`` to 2 * ``cell_lists`` lists each; one (the exact scan of every list) below
    2 * ``cell_lists`` lists, where splitting would save no distances (a code meets 2 cells' lists). Fewer,
    larger cells than sqrt(nlist) cost more distances but put fewer codes near a cell's border, where the two
    levels miss the nearest list (vote pairs at 10k images, 8,944 lists, the bench's mix: 0.85 with 35 cells,
    0.89 with 9, 0.93 flat; see ``ADD_CELLS``)."""
    return int(max(1, nlist // cell_lists))


def train_two_level(
    sample: np.ndarray, nlist: int, cell_lists: int, iterations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top centres, sub-centres, offsets): k-majority into nlist / ``cell_lists`` top cells, then each cell's sample
    codes into its share of the ``nlist`` sub-centres (by its share of the sample, at least one); cell ``t``'s
    sub-centres are rows ``offsets[t]:offsets[t + 1]``. Top cells that got no code are dropped, so every cell
    has a list. Cost: ~``len(sample) * (top + cell_lists) * iterations`` distances, not ``len * nlist * it``.
    """
    n_top = top_cell_count(nlist, cell_lists)
    top = train_lists(sample[: TOP_SAMPLE_PER_CELL * n_top], n_top, iterations)
    cell = _nearest(top, sample)
    sizes = np.bincount(cell, minlength=len(top))
    order = np.argsort(cell, kind="stable")  # within a cell, still in hash order: the seeds stay stable
    starts = np.concatenate([[0], np.cumsum(sizes)])
    kept, subs, offsets = [], [], [0]
    for t in np.nonzero(sizes)[0]:
        members = sample[order[starts[t] : starts[t + 1]]]
        share = max(1, min(len(members), round(nlist * len(members) / len(sample))))
        kept.append(t)
        subs.append(train_lists(members, share, iterations))
        offsets.append(offsets[-1] + share)
    return top[kept], np.ascontiguousarray(np.concatenate(subs)), np.array(offsets, dtype=np.int64)


def _nearest(centres: np.ndarray, codes: np.ndarray) -> np.ndarray:
    import faiss

    quantizer = faiss.IndexBinaryFlat(centres.shape[1] * 8)
    quantizer.add(np.ascontiguousarray(centres))
    _, nearest = quantizer.search(np.ascontiguousarray(codes), 1)
    return np.asarray(nearest.ravel(), dtype=np.int64)


def two_level_quantizer(top: np.ndarray, subs: np.ndarray, offsets: np.ndarray) -> Any:
    """A FAISS binary inverted file over the sub-centres, whose lists are the top cells (cell ``t``'s children
    are sub-centres ``offsets[t]:offsets[t + 1]``, added with their list numbers as ids). As the main inverted
    file's quantizer, its search with ``nprobe`` = top cells probed is the two-level assignment."""
    import faiss

    bits = top.shape[1] * 8
    cells = faiss.IndexBinaryFlat(bits)
    cells.add(np.ascontiguousarray(top))
    quantizer: Any = faiss.IndexBinaryIVF(cells, bits, len(top))
    quantizer.train(np.ascontiguousarray(top[:1]))  # its quantizer holds the top centres: nothing to learn
    subs = np.ascontiguousarray(subs)
    ids = np.arange(len(subs), dtype=np.int64)
    cell_of = np.repeat(np.arange(len(top), dtype=np.int64), np.diff(offsets))
    quantizer.add_core(len(subs), faiss.swig_ptr(subs), faiss.swig_ptr(ids), faiss.swig_ptr(cell_of))
    return quantizer


@dataclass(frozen=True)
class LocalIndexParams:
    per_image: int  # strongest descriptors of each gallery image that are indexed
    code_bytes: int  # prefix of each 32-byte ORB descriptor that is indexed
    knn: int  # neighbours looked up per query descriptor
    max_distance: int  # Hamming distance (on the prefix) beyond which a neighbour is no vote
    nprobe: int  # inverted lists visited per query descriptor (IVF only)
    flat_below: int = 50_000  # exact search is fast enough below this many descriptors, and needs no training
    train_max: int = 262_144  # most codes the lists are learned from (64 per list below that)
    max_lists: int = 65_536  # most inverted lists
    train_iterations: int = 10  # k-means rounds
    cell_lists: int = 65_536  # lists per top cell of the two-level coarse quantizer (one cell: exact assignment)
    top_probe: int = 8  # top cells whose lists are candidates for a query descriptor's nprobe nearest

    def structure(self) -> dict[str, int]:
        """The parameters a built index depends on (the others apply at query time, also to a reopened one)."""
        built = asdict(self)
        for query_time in ("knn", "max_distance", "nprobe", "top_probe"):
            built.pop(query_time)
        return built


class LocalIndexCorruptError(ValueError):
    """The saved local index cannot be read (truncated, bad checksum, another format)."""


@dataclass(frozen=True)
class Votes:
    """Per gallery image: how many query descriptors found one of its descriptors, and which ones.

    The pairs behind the votes (query descriptor ``rows[k]`` found keypoint ``keypoints[k]`` of image
    ``owners[k]``, the nearest one where it found several) are tentative matches: a homography most of them
    agree on is cheap to look for and says whether an image deserves the full ORB check (search/verify.py).
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
    """Thread-safe: searches share a lock that adds, removals and swaps take alone (FAISS crashed here on
    concurrent add+search; concurrent searches are safe)."""

    def __init__(self, params: LocalIndexParams) -> None:
        import faiss

        self.params = params
        self._bits = params.code_bytes * 8
        self._index: faiss.IndexBinary = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self._bits))
        self._quantizer: faiss.IndexBinary | None = None  # the IVF's (kept alive: FAISS does not own it)
        self._coarse: faiss.IndexBinaryIVF | None = None  # the two-level quantizer (IVF only; ``_index`` owns it)
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
                header, held, stored = _read(handle)
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
        index._held = set(held.tolist())
        index._saved_at = (path, index._changes)
        return index

    def save(self, path: Path, catalogue_id: str) -> bool:
        """Write the index to ``path`` atomically, unless nothing changed since it was saved there or read from
        there. Returns whether it wrote. Adds and removes wait meanwhile (seconds at 100k images); searches go on."""
        from pictrace.index.faiss_index import atomic_write

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
            atomic_write(path, lambda handle: _write(handle, header, held, stored))
            self._saved_at = (path, self._changes)
        return True

    def held_ids(self) -> np.ndarray:
        """The vec_ids whose codes the index holds, sorted."""
        with self._lock.read():
            return np.array(sorted(self._held), dtype=np.int64)

    def needs_training(self, growth: float = 2.0) -> bool:
        """True once the gallery outgrew what the lists were learned from by ``growth`` (or the exact index
        got slow)."""
        n = len(self)
        return n >= self.params.flat_below and n >= growth * self._trained_on

    def replace_with(self, other: LocalIndex) -> None:
        """Swap in a rebuilt index (same object, so the searcher holding this one sees the new lists)."""
        with self._lock.write():
            self._index, self._quantizer, self._trained_on = other._index, other._quantizer, other._trained_on
            self._coarse = other._coarse
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

            def lookup(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                dist, ids = self._index.search(part, self.params.knn)
                return dist, ids

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


def _write(handle: BinaryIO, header: dict[str, object], held: np.ndarray, index: Any) -> None:
    """MAGIC, a JSON header line, the held vec_ids, the FAISS binary index (an inverted file holds its two-level
    quantizer), a CRC32 of all that, END."""
    import faiss

    from pictrace.index.faiss_index import write_framed

    write_framed(handle, MAGIC, END, header, held, lambda writer: faiss.write_index_binary(index, writer))


def _read(handle: BinaryIO) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Parse a file written by ``_write``; ValueError or RuntimeError when it is not one, whole ("older format"
    in the message for a file of an older layout)."""
    import faiss

    from pictrace.index.faiss_index import read_framed

    header, held, index = read_framed(handle, MAGIC, END, "held", faiss.read_index_binary, older=OLDER)
    if int(index.ntotal) != int(header["codes"]):
        raise ValueError("code count does not match the header")
    return header, held, index
