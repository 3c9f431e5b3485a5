"""Exact / copy / similar / unrelated: answering in the user's terms instead of with a bare score.

Pure functions over the evidence a candidate already has. The thresholds live in the tuning
(``PICTRACE_COPY_*``, ``PICTRACE_SIMILAR_*``) and were set by ``bench/thresholds.py`` on the shared evaluation
data; docs/verdicts.md has the measurement.

* **exact**: the same bytes, or the same decoded pixels (the searcher knows this from the hashes).
* **copy**: the same picture edited. Many distinct ORB keypoints agree on one near-affine homography (crop,
  rescale, rotation, mirror, border, caption, recompression all keep the map affine), or, for a whole-frame
  copy too small for keypoints, the two frames' pixels agree once rescaled (pictrace/matching/frame.py); and
  the embeddings agree at least a little (a floor that stops a geometric accident on a flat background).
* **similar**: the same object or scene, another shot: a high embedding cosine, or a geometric match whose
  homography has a clear perspective (a photo of the same print taken at an angle), or a link through another
  result that matches both (the match graph, pictrace/graph.py and pictrace/search/expand.py).
* anything else is unrelated and not shown at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pictrace.tuning import Tuning

Verdict = Literal["exact", "copy", "similar"]
VERDICTS: tuple[Verdict, ...] = ("exact", "copy", "similar")


@dataclass(frozen=True)
class VerdictThresholds:
    copy_min_inliers: int
    copy_min_embedding: float
    copy_max_perspective: float
    similar_min_embedding: float
    similar_min_inliers: int
    copy_min_frame: float = 1.0

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> VerdictThresholds:
        return cls(
            copy_min_inliers=tuning.verdicts.copy_min_inliers,
            copy_min_embedding=tuning.verdicts.copy_min_embedding,
            copy_max_perspective=tuning.verdicts.copy_max_perspective,
            similar_min_embedding=tuning.verdicts.similar_min_embedding,
            similar_min_inliers=tuning.check.min_inliers,
            copy_min_frame=tuning.verdicts.copy_min_frame,
        )


def classify(
    *,
    exact: bool,
    embedding: float,
    inliers: int,
    perspective: float | None,
    thresholds: VerdictThresholds,
    linked: bool = False,
    frame: float | None = None,
) -> Verdict | None:
    """The verdict for one candidate, or None when it is unrelated and must not be shown.

    ``inliers`` are distinct-keypoint RANSAC inliers of an *accepted* homography (0 when none was accepted);
    ``perspective`` is :func:`pictrace.matching.transform.overlap_perspective` of that homography (None without one);
    ``linked``: reached through the match graph (another result matches both), which makes it at least similar;
    ``frame``: :func:`pictrace.matching.frame.frame_agreement` of two same-aspect images (None: not checked).
    """
    if exact:
        return "exact"
    geometric = perspective is not None and inliers > 0
    if (
        geometric
        and inliers >= thresholds.copy_min_inliers
        and embedding >= thresholds.copy_min_embedding
        and perspective is not None
        and perspective <= thresholds.copy_max_perspective
    ):
        return "copy"
    if frame is not None and frame >= thresholds.copy_min_frame and embedding >= thresholds.copy_min_embedding:
        return "copy"
    if linked or embedding >= thresholds.similar_min_embedding:
        return "similar"
    if geometric and inliers >= thresholds.similar_min_inliers:
        return "similar"
    return None
