"""What a query's local descriptors found in the local-feature index: votes per gallery image, and the
tentative matches behind them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Votes:
    """Per gallery image: how many query descriptors found one of its descriptors, and which ones.

    The pairs behind the votes (query descriptor ``rows[k]`` found keypoint ``keypoints[k]`` of image
    ``owners[k]``, the nearest one where it found several) are tentative matches: a homography most of them
    agree on is cheap to look for and says whether an image deserves the full ORB check (ranking.screened).
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
