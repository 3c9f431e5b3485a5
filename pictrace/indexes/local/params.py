"""How the local-feature index is built and queried."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pictrace.tuning import LocalVotes


@dataclass(frozen=True)
class LocalIndexParams:
    per_image: int  # strongest descriptors of each gallery image that are indexed
    code_bytes: int  # prefix of each 32-byte ORB descriptor that is indexed
    knn: int  # neighbours looked up per query descriptor
    max_distance: int  # Hamming distance (on the prefix) beyond which a neighbour is no vote
    nprobe: int  # inverted lists visited per query descriptor (IVF only)
    scan_budget: float | None = None  # codes scanned per descriptor at most, in nprobe average lists (IVF only)
    flat_below: int = 50_000  # exact search is fast enough below this many descriptors, and needs no training
    train_max: int = 262_144  # most codes the lists are learned from (64 per list below that)
    max_lists: int = 65_536  # most inverted lists
    train_iterations: int = 10  # k-means rounds
    cell_lists: int = 65_536  # lists per top cell of the two-level coarse quantizer (one cell: exact assignment)
    top_probe: int = 8  # top cells whose lists are candidates for a query descriptor's nprobe nearest
    query_cell_lists: int | None = None  # lists per cell a query searches where the codes were filed exactly
    relearn_growth: float = 4.0  # growth since the lists were learned that has them learned again (needs_training)

    def structure(self) -> dict[str, int | float]:
        """The parameters a built index depends on (the others apply at query time, also to a reopened one)."""
        built = asdict(self)
        for query_time in (
            "knn", "max_distance", "nprobe", "scan_budget", "top_probe", "query_cell_lists", "relearn_growth"
        ):
            built.pop(query_time)
        return built


def local_index_params(tuning: LocalVotes) -> LocalIndexParams:
    """The index's own parameters from the tuned ones (no ``cell_lists``: one cell, the exact list scan)."""
    return LocalIndexParams(
        per_image=tuning.per_image,
        code_bytes=tuning.code_bytes,
        knn=tuning.knn,
        max_distance=tuning.max_distance,
        nprobe=tuning.nprobe,
        scan_budget=tuning.scan_budget,
        flat_below=tuning.flat_below,
        train_max=tuning.train_max,
        max_lists=tuning.max_lists,
        train_iterations=tuning.train_iterations,
        cell_lists=tuning.max_lists if tuning.cell_lists is None else tuning.cell_lists,
        top_probe=tuning.top_probe,
        query_cell_lists=tuning.query_cell_lists,
        relearn_growth=tuning.relearn_growth,
    )
