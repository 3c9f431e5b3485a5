"""The local-feature index's inverted lists, learned from the gallery's own codes.

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

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

TOP_SAMPLE_PER_CELL = 512  # codes per top cell its centres are learned from (the sub-centres use all)


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
    return _filed_under(top, subs, np.repeat(np.arange(len(top), dtype=np.int64), np.diff(offsets)))


def query_cells(centres: np.ndarray, cell_lists: int, iterations: int) -> Any:
    """Top cells over the lists of an exact assignment, for queries only: the lists' centres (row ``i`` is list
    ``i``) k-majority clustered into ``len // cell_lists`` cells, each centre filed under its nearest cell.
    Searched with ``nprobe`` = top cells probed, it gives a query descriptor's nearest lists among those cells'
    instead of comparing it with every centre. The codes stay in the lists their exact assignment chose, so a
    missed list costs only that query; at 100k real images 8 of 23 cells kept 0.974 of the vote pairs for 15 of
    the lookup's 75 ms (docs/scaling.md, "Query cells"). None below two cells."""
    n_top = top_cell_count(len(centres), cell_lists)
    if n_top < 2:
        return None
    top = train_lists(centres, n_top, iterations)
    cell_of = _nearest(top, centres)
    kept = np.unique(cell_of)  # cells that got no centre are dropped, so every cell has a list
    renumbered = np.searchsorted(kept, cell_of)
    return _filed_under(top[kept], centres, renumbered)


def _filed_under(top: np.ndarray, centres: np.ndarray, cell_of: np.ndarray) -> Any:
    """A FAISS binary inverted file over ``centres`` (ids: their row numbers, i.e. the main index's list
    numbers), whose lists are the top cells: centre ``i`` is in cell ``cell_of[i]``."""
    import faiss

    bits = top.shape[1] * 8
    cells = faiss.IndexBinaryFlat(bits)
    cells.add(np.ascontiguousarray(top))
    quantizer: Any = faiss.IndexBinaryIVF(cells, bits, len(top))
    quantizer.train(np.ascontiguousarray(top[:1]))  # its quantizer holds the top centres: nothing to learn
    centres = np.ascontiguousarray(centres)
    ids = np.arange(len(centres), dtype=np.int64)
    cell_of = np.ascontiguousarray(cell_of, dtype=np.int64)
    quantizer.add_core(len(centres), faiss.swig_ptr(centres), faiss.swig_ptr(ids), faiss.swig_ptr(cell_of))
    return quantizer
