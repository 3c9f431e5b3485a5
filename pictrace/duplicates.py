"""Every duplicate in the gallery at once: groups of the same picture, a keeper for each, what was done to the rest.

Derived from the catalogue alone (links and decisions):

* **exact**: images with the same decoded pixels (the same bytes are one image already: the catalogue is keyed
  by SHA-256);
* **copy**: the match graph's links whose verdict is copy (pictrace/graph.py classifies each pair at ingest with
  the search's own ``classify``), grouped as stars: each member a copy of its group's anchor by the homography
  that joins them (pictrace/grouping.py: a collage of two photos no longer chains their groups into one), and
  never with a pair a person decided is "not duplicates";
* **similar** links (another shot, a look-alike) are listed beside a group, never merged into it.

No pass over all pairs, and no regrouping per page: the partition is built in a background thread when the
service starts, followed incrementally as images, links and decisions change, and persisted in the catalogue
(the same groups after a restart). A page reads the latest partition and describes only what it shows.

The keeper is the member the others were made from: the one with the fewest kinds of difference to the others
(an edit is one step from its source, two edits two steps from each other), then one no other member shows
more of or sharper, then the most pixels, then the most bytes. A person's "keep this one" overrides the rule.
What was done to each member relative to the keeper is read off the composed homographies of the links from it
to the keeper: crop box, scale, rotation, mirror, and an added border (the keeper fills only part of the
member's frame). Recolouring and added text keep the geometry: they are not read out.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from pictrace.errors import GroupsNotReadyError, NotFoundError
from pictrace.grouping import Grouping, Shape
from pictrace.matching.frame import cells_agreeing
from pictrace.matching.transform import TransformReadout, read_transform
from pictrace.schemas import DuplicateEdit, DuplicateGroupInfo, DuplicateImage, DuplicateMember, thumbnail_url
from pictrace.store import Catalogue, GroupLinks, ImageFacts
from pictrace.sync import covers, net_effect
from pictrace.tuning import Duplicates as DuplicatesTuning

log = logging.getLogger(__name__)

GroupTier = Literal["exact", "copy"]

# An image is "inside" another when at least this share of its frame's area lands in the other image.
_COVERED = 0.97
# A scale this far above 1 means the other image shows the same content with more pixels.
_SHARPER = 1.05
# A member whose frame extends this far (share of its side) past the keeper's picture has an added border.
_BORDER = 0.03
_IDENTITY = np.eye(3)
# Grey-level spread below which a margin is a border, not picture (JPEG noise on a plain colour is ~2-5).
_FLAT_STD = 12.0
# Differences the keeper counts (thumbnails compared after the fit): a turn of at least 2 degrees; a colour gap
# (|dCr| + |dCb|, 0-255 levels) above 12 at the 90th percentile of the shared part, or one image 1.5x as
# colourful as the other (mean |Cr| + |Cb| + 0.5: product shots on white average 1-7, a grey copy 0, a
# recompressed one within ~10 %); grey levels apart by more than 40 on over 1 % of it (a caption, a sticker).
_TURNED = 2.0
_COLOUR_GAP = 8.0
_COLOURFUL = 1.5
_GREY = 0.5  # mean chroma below which an image is grey
_LUMA_GAP = 40.0
_CONTENT_SHARE = 0.02
_LOOK_SIDE = 64  # thumbnails are compared at most this large (64, 96, 128 px: keeper 84, 83, 83 of 100)
_THUMBNAIL_SIDE = 256  # the stored thumbnail's longest side (pictrace/features/thumbnail.py)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_MIN_SHARED = 64  # pixels of overlap below which the thumbnails say nothing


@dataclass(frozen=True)
class Edit:
    """What was done to a member relative to the keeper (keeper pixels for ``crop``)."""

    crop: tuple[int, int, int, int]  # the box of the keeper the member shows
    crop_fraction: float  # its share of the keeper's area
    scale: float  # member pixels per keeper pixel
    rotation: float  # degrees counter-clockwise
    flip: bool  # mirrored left-right
    border: bool  # the member's frame holds more than the keeper's picture (a border, a page around it)
    perspective: float
    hops: int  # links composed from the member to the keeper (1: matched directly)


@dataclass(frozen=True)
class Member:
    facts: ImageFacts
    tier: Literal["keeper", "exact", "copy"]
    edit: Edit | None  # None for the keeper and for exact copies (the identity)


@dataclass(frozen=True)
class Group:
    id: str
    tier: GroupTier
    keeper: ImageFacts
    members: list[Member]  # the keeper first
    decided: bool  # the keeper was chosen by a person
    similar: list[ImageFacts] = field(default_factory=list)  # linked as similar, not in the group
    size: int = 0  # members in all (``members`` may be one page of them)
    offset: int = 0  # where ``members`` starts among them (the keeper is the first)


Looks = Callable[[ImageFacts], "np.ndarray | None"]  # a member's stored thumbnail (BGR), None if unreadable


def choose_keeper(
    members: Sequence[ImageFacts],
    fits: dict[tuple[int, int], np.ndarray],
    chosen: str | None = None,
    flat_margin: Callable[[ImageFacts, tuple[int, int, int, int]], bool] = lambda m, box: False,
    looks: Looks | None = None,
) -> ImageFacts:
    """The member the others were derived from: a person's choice, else the one that differs least from the
    others, then one no other shows more of or sharper, then the most pixels, then the most bytes. ``fits``:
    homographies ``(a, b)`` -> a's pixels to b's, composed along the group's links for pairs that did not
    match directly (a screenshot may only match a crop).

    *Differs least*: every edit is one step away from its source, and two edits of one source are each
    other's two steps apart, so the source is the member with the fewest kinds of difference (rotation,
    mirror, scale, extent; with ``looks``, colour and content) to the others, on average over the pairs it
    has. It decides where pixels cannot: which of a photo, its mirror, its grey and its captioned copy is the
    original. It cannot in a pair of two, and ties are read as before:

    a is lesser than b when a shows all of b but smaller (a screenshot, a downscaled copy), or a lies inside
    b with the same or fewer pixels for it while b shows more around it (a crop). Geometry alone cannot tell
    that crop from b being a framed with a border: ``flat_margin(b, box)`` says whether b outside ``box``
    (where a lies, b's pixels) is flat (a border, padding), and then b is the lesser one. Of two that differ in
    colour, the less colourful is lesser (colour is lost by an edit, not invented).
    """
    for m in members:
        if chosen is not None and m.sha256 == chosen:
            return m
    by_id = {m.vec_id: m for m in members}
    lesser: set[int] = set()
    steps: dict[int, list[int]] = {v: [] for v in by_id}
    seen: set[tuple[int, int]] = set()
    thumbnails: dict[int, np.ndarray | None] = {}

    def look(m: ImageFacts) -> np.ndarray | None:
        if looks is None:
            return None
        if m.vec_id not in thumbnails:
            thumbnails[m.vec_id] = looks(m)
        return thumbnails[m.vec_id]

    pairs = _all_pairs(fits, by_id)
    if len(members) > _COMPOSE_UP_TO:
        # a large group (crops and mosaics chained through shared pictures) is read only where its keeper can
        # be: its fullest members and their own pairs. All its pairs cost ~0.1 ms each, ~13 s for the first
        # page of a 10k real-content gallery's largest groups
        pool = sorted(members, key=lambda m: (-m.width * m.height, -m.nbytes, m.vec_id))[:_KEEPER_POOL]
        fullest = {m.vec_id for m in pool}
        pairs = {k: v for k, v in pairs.items() if k[0] in fullest or k[1] in fullest}
        members = pool
    for (a, b), hom in pairs.items():
        fa, fb = by_id[a], by_id[b]
        first = (min(a, b), max(a, b)) not in seen
        seen.add((min(a, b), max(a, b)))
        if fa.pixel_sha256 == fb.pixel_sha256:
            if first:
                steps[a].append(0)
                steps[b].append(0)
            continue
        readout = read_transform(hom, (fa.width, fa.height), (fb.width, fb.height))
        qx0, qy0, qx1, qy1 = readout.query_box  # where b lies in a
        a_inside = max(0, qx1 - qx0) * max(0, qy1 - qy0) / float(max(1, fa.width * fa.height))
        b_shown = readout.crop_fraction  # how much of b a shows
        if first:
            kinds = _geometric_steps(readout, a_inside, b_shown)
            # pixels are compared only where one is the other's pixels moved (mirrored, shifted, cropped):
            # resampling a turned or rescaled thumbnail makes colour and grey-level gaps of its own
            moved = not kinds & {"rotation", "scale"}
            colour = _photometric_steps(look(fa), look(fb), hom, fa, fb) if moved else None
            if colour is not None:
                kinds |= colour[0]
                if min(colour[1:]) < _GREY <= max(colour[1:]):
                    lesser.add(a if colour[1] < colour[2] else b)  # grey: colour is lost, never invented
            steps[a].append(len(kinds))
            steps[b].append(len(kinds))
        if a in lesser:
            continue
        if b_shown >= _COVERED and readout.scale < 1.0 / _SHARPER:
            lesser.add(a)  # all of b, smaller
        elif a_inside >= _COVERED and b_shown < _COVERED and readout.scale <= _SHARPER:
            back = read_transform(np.linalg.inv(hom), (fb.width, fb.height), (fa.width, fa.height))
            lesser.add(b if flat_margin(fb, back.query_box) else a)  # a crop of b, or b a framed
    mean = {m.vec_id: (sum(d) / len(d) if (d := steps[m.vec_id]) else math.inf) for m in members}
    fewest = min(mean.values())
    closest = [m for m in members if mean[m.vec_id] <= fewest + 1e-9]
    candidates = [m for m in closest if m.vec_id not in lesser] or closest
    return max(candidates, key=lambda m: (m.width * m.height, m.nbytes, -m.vec_id))


def _geometric_steps(readout: TransformReadout, a_inside: float, b_shown: float) -> set[str]:
    kinds = set()
    if abs(readout.rotation) >= _TURNED:
        kinds.add("rotation")
    if readout.flip:
        kinds.add("mirror")
    if abs(math.log(max(readout.scale, 1e-6))) >= math.log(_SHARPER):
        kinds.add("scale")
    if a_inside < _COVERED or b_shown < _COVERED:
        kinds.add("extent")
    return kinds


def _photometric_steps(
    a: np.ndarray | None, b: np.ndarray | None, hom: np.ndarray, fa: ImageFacts, fb: ImageFacts
) -> tuple[set[str], float, float] | None:
    """({"colour", "content"} as they differ, a's and b's colourfulness) over the part both show, compared in
    the frame of the one with fewer pixels; None without both thumbnails."""
    if a is None or b is None:
        return None
    if fa.width * fa.height > fb.width * fb.height:
        swapped = _photometric_steps(b, a, np.linalg.inv(hom), fb, fa)
        return None if swapped is None else (swapped[0], swapped[2], swapped[1])
    to_a = np.diag([a.shape[1] / fa.width, a.shape[0] / fa.height, 1.0])
    to_b = np.diag([b.shape[1] / fb.width, b.shape[0] / fb.height, 1.0])
    a_to_b = to_b @ hom @ np.linalg.inv(to_a)  # a's thumbnail pixels -> b's
    shrink = math.sqrt(abs(float(np.linalg.det(a_to_b[:2, :2]) / a_to_b[2, 2] ** 2)))
    if shrink > 1.5:  # b is drawn much smaller: average its pixels first, or its fine texture aliases
        b = cv2.resize(
            b, (max(1, round(b.shape[1] / shrink)), max(1, round(b.shape[0] / shrink))), interpolation=cv2.INTER_AREA
        )
        a_to_b = np.diag([1 / shrink, 1 / shrink, 1.0]) @ a_to_b
    size = (a.shape[1], a.shape[0])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(b, a_to_b, size, flags=flags)
    inside = cv2.warpPerspective(np.full(b.shape[:2], 255, np.uint8), a_to_b, size, flags=flags)
    mask = cv2.erode(inside, np.ones((5, 5), np.uint8)) == 255
    if mask.sum() < _MIN_SHARED:
        return None
    ya, yb = (
        cv2.GaussianBlur(cv2.cvtColor(x, cv2.COLOR_BGR2YCrCb).astype(np.float32), (0, 0), 1.0) for x in (a, warped)
    )
    chroma_a = float(np.abs(ya[..., 1:] - 128.0).sum(axis=2)[mask].mean())
    chroma_b = float(np.abs(yb[..., 1:] - 128.0).sum(axis=2)[mask].mean())
    colour_gap = np.abs(ya[..., 1:] - yb[..., 1:]).sum(axis=2)[mask]
    luma_gap = np.abs(ya[..., 0] - yb[..., 0])[mask]
    kinds = set()
    grey = min(chroma_a, chroma_b) < _GREY <= max(chroma_a, chroma_b) / 2
    if grey or float(np.percentile(colour_gap, 90)) > _COLOUR_GAP:
        kinds.add("colour")
    if float((luma_gap > _LUMA_GAP).mean()) > _CONTENT_SHARE:
        kinds.add("content")
    return kinds, chroma_a, chroma_b


# Groups larger than this compare their members through direct links only (the pairwise paths grow as n^2).
_COMPOSE_UP_TO = 24
_KEEPER_POOL = 8  # the fullest members of a larger group that may be its keeper


def _all_pairs(
    fits: dict[tuple[int, int], np.ndarray], by_id: dict[int, ImageFacts]
) -> dict[tuple[int, int], np.ndarray]:
    """Direct fits, and for a small group every other pair too through composed homographies."""
    pairs = {k: v for k, v in fits.items() if k[0] in by_id and k[1] in by_id}
    if len(by_id) > _COMPOSE_UP_TO:
        return pairs
    for b in by_id:
        for a, (hom, _) in _paths_to(b, pairs).items():
            if a != b and (a, b) not in pairs:
                pairs[(a, b)] = hom
    return pairs


def flat_outside(thumbnail: bytes, size: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    """Whether an image (its stored thumbnail; ``size`` the original's) is flat outside ``box`` (original
    pixels): a border or padding around a picture rather than more of it."""
    gray = cv2.imdecode(np.frombuffer(thumbnail, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        return False
    fx, fy = gray.shape[1] / float(size[0]), gray.shape[0] / float(size[1])
    x0, y0, x1, y1 = (round(box[0] * fx), round(box[1] * fy), round(box[2] * fx), round(box[3] * fy))
    mask = np.ones(gray.shape, dtype=bool)
    # a pixel of slack: the box's edge is where JPEG blurs the picture into the border
    mask[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = False
    outside = gray[mask]
    return bool(outside.size == 0 or float(outside.std()) < _FLAT_STD)


def _paths_to(keeper: int, fits: dict[tuple[int, int], np.ndarray]) -> dict[int, tuple[np.ndarray, int]]:
    """For each member reachable from the keeper: its pixels -> keeper pixels (composed), and the hops."""
    neighbours: dict[int, list[int]] = {}
    for a, b in fits:
        neighbours.setdefault(b, []).append(a)
    out: dict[int, tuple[np.ndarray, int]] = {keeper: (_IDENTITY, 0)}
    queue = deque([keeper])
    while queue:
        node = queue.popleft()
        to_keeper, hops = out[node]
        for prev in neighbours.get(node, []):
            if prev not in out:
                out[prev] = (to_keeper @ fits[(prev, node)], hops + 1)
                queue.append(prev)
    return out


def edit_of(readout: TransformReadout, size: tuple[int, int], hops: int) -> Edit:
    qx0, qy0, qx1, qy1 = readout.query_box
    w, h = size
    border = min(qx0, qy0) > _BORDER * min(w, h) or (w - qx1) > _BORDER * w or (h - qy1) > _BORDER * h
    return Edit(
        crop=readout.crop,
        crop_fraction=readout.crop_fraction,
        scale=readout.scale,
        rotation=readout.rotation,
        flip=readout.flip,
        border=bool(border),
        perspective=readout.perspective,
        hops=hops,
    )


_META_KEY = "duplicate_groups"
_FORMAT = 1


class _StoppedError(Exception):
    """``close`` was called during a first build: the build ends at its next slice of links or thumbnail."""


_CLOSE_WAIT_S = 10.0  # how long a close waits for the thread to finish what it is doing
_SETTLE_AFTER_S = 10.0  # no image added for this long: an ingest run has ended (its pauses are shorter)
_RECENT_S = 30.0  # an image's links are read again for this long after it was added (the ingest links it then)
# The copy-link tally (a COUNT over every copy link: 0.26 s of CPU at 100k images, ~2.6 s at 1M) runs again no
# sooner than this many times its last CPU time after it, and no later than half of _RECENT_S (the recent images'
# links are read before they leave that window): following an ingest's links costs at most ~5 % of a core up to
# ~300k images. A gallery of thousands tallies in a millisecond, on every tick: when its links are read decides
# how its groups are placed during an ingest (docs/duplicates.md).
_TALLY_EVERY = 20.0
_GREYS_KEPT = 4096  # grey thumbnails kept while grouping (~4 KB at 64 px, ~40 KB at 256 px)
_FIRST_PAGE = 20  # groups of the first list page (the API's default limit): their keepers are chosen first


@dataclass(frozen=True)
class _View:
    """One state of the partition as pages read it: immutable, swapped whole when the partition changes."""

    groups: list[list[int]]  # vec_ids, the anchor first, the rest by vec_id; largest groups first
    ids: list[str]
    tiers: list[GroupTier]
    decided: list[bool]
    where: dict[str, int]  # group id or member sha256 -> index in ``groups``
    pixels: dict[int, str]  # pixel_sha256 of each grouped image


class DuplicateGroups:
    """The duplicate groups of one catalogue (pictrace/grouping.py's partition), built in a background thread
    when the service starts, then kept up to date as images, links and decisions change (the catalogue's change
    log and link counters, read every ``tuning.refresh_s``); persisted in the catalogue, so a restart reads the
    same groups back. Pages read the latest state and never wait for it: before the first one is ready they
    raise GroupsNotReadyError (503 with Retry-After)."""

    def __init__(self, catalogue: Catalogue, tuning: DuplicatesTuning | None = None) -> None:
        self.catalogue = catalogue
        self.tuning = tuning or DuplicatesTuning()
        self._lock = threading.RLock()  # the grouping and what it has read; pages read ``_view`` without it
        self._grouping: Grouping | None = None
        self._building: Grouping | None = None  # while the first partition is built
        self._greys: dict[tuple[int, int], np.ndarray | None] = {}  # thumbnails in grey, a few thousand kept
        self._view: _View | None = None
        self._sha: dict[int, str] = {}
        self._position: tuple[int, int] = (-1, -1)  # change log (seq, generation) applied
        self._link_generation = -1  # the catalogue's link counter, links read up to it
        self._links_seen = -1  # the link counter last seen, read or not (when links were last written)
        self._tally_due = 0.0  # the copy-link tally runs no sooner (monotonic; _TALLY_EVERY)
        self._decisions: tuple[list[tuple[str, str]], list[str]] = ([], [])
        self._recent: dict[int, float] = {}  # images added lately, and when: their links are read again
        self._links_stale = False  # the catalogue's copy links did not tally with those known
        self._unsettled: set[int] = set()  # images placed one batch at a time, to place again together
        self._added_at = 0.0  # when the last image was added (monotonic)
        self._linked_at = 0.0  # when links were last seen written (monotonic)
        self._keepers: dict[int, tuple[tuple[int, ...], int]] = {}  # anchor -> (its group, the keeper chosen)
        self._dirty = False
        self._saved_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False  # the first partition is published and its first page's keepers chosen
        self.ready_s: float | None = None  # seconds from start() to ready
        self.cpu_s = 0.0  # CPU time the thread has spent (what following an ingest costs)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build (or read back) the partition in a thread of its own, then follow the catalogue."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, name="duplicate-groups", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop following and store the partition. A first build still running (minutes at 100k) stops at its
        next slice of links or thumbnail check, unstored: the next start builds again."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=_CLOSE_WAIT_S)
            if thread.is_alive():
                log.info("the duplicate groups were still being computed at close: not stored")
                return
        with self._lock:
            if self._dirty:
                self._save()

    @property
    def ready(self) -> bool:
        return self._ready

    def pending_keepers(self) -> int:
        """Groups whose keeper is not chosen yet (the thread chooses them in list order; a page chooses those
        it shows that the thread has not reached)."""
        view = self._view
        if view is None:
            return 0
        return sum(1 for i in range(len(view.groups)) if not self._has_keeper(view, i))

    def _has_keeper(self, view: _View, index: int) -> bool:
        cached = self._keepers.get(view.groups[index][0])
        return view.decided[index] or (cached is not None and cached[0] == tuple(view.groups[index]))

    def _follow(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            more = False
            cpu = time.thread_time()
            try:
                self._refresh()
                # the first page's keepers before the first page is served: it then only reads them
                more = self._choose_keepers(deadline=time.perf_counter() + self.tuning.refresh_s)
                if not self._ready:
                    self._choose_keepers(deadline=math.inf, groups=_FIRST_PAGE)
                    self._ready = True
                    self.ready_s = time.perf_counter() - started
                    log.info("duplicate groups ready in %.1f s", self.ready_s)
                if self._dirty and time.monotonic() - self._saved_at >= self.tuning.save_every_s:
                    with self._lock:
                        self._save()
            except _StoppedError:
                break
            except Exception:  # a database hiccup must not end the thread; retried on the next tick
                if self._stop.is_set():  # closed meanwhile, the catalogue too: the work is dropped, as close says
                    break
                log.exception("could not update the duplicate groups; retrying")
            self.cpu_s += time.thread_time() - cpu
            self._stop.wait(0.01 if more else self.tuning.refresh_s)

    # --- following the catalogue ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the partition up to date with the catalogue now (the thread does this every ``refresh_s``; the
        CLI, the tests and a decision call it to see their own writes)."""
        self._refresh(eager=True)
        self._ready = True

    def _refresh(self, eager: bool = False) -> None:
        """``eager``: links among older images are read again at once, not once the gallery is quiet."""
        with self._lock:
            if self._grouping is None:
                self._build()
            else:
                self._update(eager)

    def _new_grouping(self) -> Grouping:
        t = self.tuning
        return Grouping(
            containment=t.containment,
            join_min_inliers=t.join_min_inliers,
            max_hops=t.max_hops,
            looks_alike=self._looks_alike,
        )

    def _looks_alike(self, member: int, anchor: int, to_anchor: np.ndarray) -> bool:
        """Whether a member reached through another one shows, by its stored thumbnail, what the anchor's shows
        where the composed map puts it (pictrace/matching/frame.py's cells_agreeing)."""
        grouping = self._grouping if self._grouping is not None else self._building
        assert grouping is not None
        self._stop_building()
        small, large = self._grey(member, _LOOK_SIDE), self._grey(anchor, _THUMBNAIL_SIDE)
        if small is None or large is None:
            return False
        m, a = grouping.shapes[member], grouping.shapes[anchor]
        to_small = np.diag([small.shape[1] / m.width, small.shape[0] / m.height, 1.0])
        to_large = np.diag([large.shape[1] / a.width, large.shape[0] / a.height, 1.0])
        small_to_large = to_large @ to_anchor @ np.linalg.inv(to_small)
        return cells_agreeing(small, large, small_to_large) >= self.tuning.hop_agreement

    def _grey(self, vec_id: int, side: int) -> np.ndarray | None:
        key = (vec_id, side)
        if key not in self._greys:
            if len(self._greys) >= _GREYS_KEPT:
                self._greys.pop(next(iter(self._greys)))
            sha = self._sha.get(vec_id)
            blob = self.catalogue.thumbnail(sha) if sha is not None else b""
            # a JPEG decodes at 1/4 size for a fraction of the work: 64 px of a 256 px thumbnail
            flag = cv2.IMREAD_REDUCED_GRAYSCALE_4 if side * 4 <= _THUMBNAIL_SIDE else cv2.IMREAD_GRAYSCALE
            grey = cv2.imdecode(np.frombuffer(blob, np.uint8), flag) if blob else None
            if grey is not None and max(grey.shape) > side:
                factor = side / max(grey.shape)
                size = (max(1, round(grey.shape[1] * factor)), max(1, round(grey.shape[0] * factor)))
                grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
            self._greys[key] = None if grey is None else np.asarray(grey)
        return self._greys[key]

    def _build(self) -> None:
        position, link_generation = self.catalogue.change_position(), self.catalogue.link_generation()
        grouping = self._building = self._new_grouping()
        shapes = self.catalogue.image_shapes()
        self._sha = {v: sha for v, sha, *_ in shapes}
        grouping.add_images({v: Shape(w, h, n, pixels) for v, _, pixels, w, h, n in shapes})
        for part in self.catalogue.copy_fit_slices():
            self._stop_building()
            grouping.add_links(part)
        self._decisions = self.catalogue.decisions()
        released = grouping.set_decisions(*self._decided(self._decisions))
        groups, via, alone = self._stored()
        loose = grouping.restore(groups, via, alone)
        known = {v for g in groups for v in g} | set(alone)
        # what the stored partition placed stays as it was (the same groups after a restart); the rest is placed
        grouping.place(released | loose | (set(grouping.shapes) - known))
        self._grouping = grouping
        self._building = None
        self._greys.clear()
        self._position, self._link_generation = (position.seq, position.generation), link_generation
        self._links_seen = link_generation
        self._publish()

    def _stop_building(self) -> None:
        """Raise ``_StoppedError`` when ``close`` was called during a first build (minutes at 100k images): the
        process then exits without waiting for it, and the next start builds again. An update is never cut
        short: its partition is the one ``close`` stores."""
        if self._building is not None and self._stop.is_set():
            self._building = None
            raise _StoppedError

    def _update(self, eager: bool = False) -> None:
        grouping = self._grouping
        assert grouping is not None
        position, link_generation = self.catalogue.change_position(), self.catalogue.link_generation()
        unchanged = (position.seq, position.generation) == self._position and link_generation == self._link_generation
        if unchanged and not self._links_stale and not self._unsettled:
            return
        touched: set[int] = set()
        added, removed = set[int](), set[int]()
        if position.generation != self._position[1]:
            # the change log's rows since the last tick, as replicas follow it; in full (every image's shape:
            # ~0.3 s at 100k, and every tick of an ingest moves the generation) only where the log was trimmed
            changes = self.catalogue.changes_after(self._position[0])
            if covers(changes, self._position[1], position.generation):
                new, gone = net_effect(changes)
                added, removed = set(new), set(gone)
            else:
                current = {v for v, *_ in self.catalogue.image_shapes()}
                added, removed = current - set(grouping.shapes), set(grouping.shapes) - current
        touched |= grouping.remove_images(removed)
        for v in removed:
            self._sha.pop(v, None)
        shapes = self.catalogue.image_shapes(v for v in added if v not in grouping.shapes)  # not a copy of 100k keys
        self._sha.update((v, sha) for v, sha, *_ in shapes)
        twins = self.catalogue.same_pixels(pixels for _, _, pixels, *_ in shapes) if shapes else {}
        touched |= grouping.add_images({v: Shape(w, h, n, pixels) for v, _, pixels, w, h, n in shapes}, twins)
        now = time.monotonic()
        if link_generation != self._links_seen:
            self._linked_at, self._links_seen = now, link_generation
        self._recent.update((v, now) for v, *_ in shapes)
        self._recent = {v: t for v, t in self._recent.items() if now - t <= _RECENT_S and v in grouping.shapes}
        links_changed = link_generation != self._link_generation or self._links_stale
        if links_changed and not eager and now < self._tally_due:
            link_generation = self._link_generation  # left for a later tick to read
        elif links_changed:
            counted = time.thread_time()  # its own CPU: waiting for the cores an ingest keeps busy is not its cost
            tally = self.catalogue.copy_tally()
            self._tally_due = now + min(_TALLY_EVERY * (time.thread_time() - counted), _RECENT_S / 2)
            if tally != grouping.tally() and self._recent:
                # the links of the images added lately: an ingest writes them a moment after the images
                touched |= grouping.add_links(self.catalogue.copy_fits(self._recent))
            # a link among older images appeared, changed or went (those owed at the end of an ingest run):
            # read them all again once the gallery is quiet, no image added and no link written for a while
            # (at 100k a read of every copy link takes ~9 s: once a second, it starved an ingest's writes)
            self._links_stale = tally != grouping.tally()
            quiet = not shapes and now - max(self._added_at, self._linked_at) >= _SETTLE_AFTER_S
            if self._links_stale and (quiet or eager):
                stored = grouping.stored_pairs()
                for part in self.catalogue.copy_fit_slices():
                    stored -= {(a, b) for a, b, *_ in part}
                    touched |= grouping.add_links(part)
                for a, b in stored:
                    touched |= grouping.remove_link(a, b)
                self._links_stale = False
            decisions = self.catalogue.decisions()
            if decisions != self._decisions:
                self._decisions = decisions
                touched |= grouping.set_decisions(*self._decided(decisions))
        # once the gallery is quiet (no image added for a while: an ingest run has ended), the groups of the
        # images added since are placed again together, fullest first, as a build would place them. Placed one
        # batch at a time, an edit that arrived before its original anchored a group the original could only
        # join as a member (copy-public ingested with the groups following: precision 0.980, recall 0.825,
        # against 0.990 / 0.838 built at once)
        self._unsettled |= {v for v, *_ in shapes}
        if shapes:
            self._added_at = now
        if self._unsettled and now - self._added_at >= _SETTLE_AFTER_S:
            for v in self._unsettled & set(grouping.shapes):
                touched |= grouping.release(v)
            self._unsettled.clear()
        grouping.place(touched)
        self._position, self._link_generation = (position.seq, position.generation), link_generation
        self._publish()

    def _decided(self, decisions: tuple[list[tuple[str, str]], list[str]]) -> tuple[list[tuple[int, int]], list[int]]:
        distinct, kept = decisions
        vec_of = self.catalogue.vec_ids_of({s for pair in distinct for s in pair} | set(kept))
        apart = [(vec_of[a], vec_of[b]) for a, b in distinct if a in vec_of and b in vec_of]
        return apart, [vec_of[s] for s in kept if s in vec_of]

    def _publish(self) -> None:
        """Swap in the view of the partition as it now is (largest groups first) if it changed."""
        grouping = self._grouping
        assert grouping is not None
        groups = [[g[0], *sorted(g[1:])] for g in grouping.groups()]
        ids = [_group_id(min(self._sha[v] for v in g)) for g in groups]
        order = sorted(range(len(groups)), key=lambda i: (-len(groups[i]), ids[i]))
        groups, ids = [groups[i] for i in order], [ids[i] for i in order]
        if self._view is not None and self._view.groups == groups:
            return
        pixels = {v: grouping.shapes[v].pixel_sha256 for g in groups for v in g}
        where = {gid: i for i, gid in enumerate(ids)}
        where.update((self._sha[v], i) for i, g in enumerate(groups) for v in g)
        self._view = _View(
            groups=groups,
            ids=ids,
            tiers=["exact" if len({pixels[v] for v in g}) == 1 else "copy" for g in groups],
            decided=[g[0] in grouping.kept for g in groups],
            where=where,
            pixels=pixels,
        )
        self._dirty = True

    # --- persistence: a restart reads the same groups back ---------------------------------------------------
    def _rule(self) -> list[float]:
        t = self.tuning
        return [t.containment, t.join_min_inliers, t.max_hops, t.hop_agreement]

    def _save(self) -> None:
        view = self._view
        if view is None:
            return
        keepers = {str(a): k for a, (members, k) in self._keepers.items()}
        grouping = self._grouping
        alone = grouping.alone() if grouping is not None else []
        via = sorted(grouping.vias().items()) if grouping is not None else []
        state = {
            "format": _FORMAT,
            "rule": self._rule(),
            "groups": view.groups,
            "via": via,
            "alone": alone,
            "keepers": keepers,
        }
        self.catalogue.set_meta(_META_KEY, json.dumps(state, separators=(",", ":")))
        self._dirty = False
        self._saved_at = time.monotonic()

    def _stored(self) -> tuple[list[list[int]], dict[int, int], list[int]]:
        """The partition a previous run stored: (groups, what each member joined through, anchors alone);
        nothing where none fits this rule."""
        raw = self.catalogue.get_meta(_META_KEY)
        if raw is None:
            return [], {}, []
        try:
            state = json.loads(raw)
            if state.get("format") != _FORMAT or state.get("rule") != self._rule():
                return [], {}, []
            groups = [[int(v) for v in g] for g in state["groups"]]
            via = {int(m): int(v) for m, v in state.get("via", [])}
            alone = [int(v) for v in state.get("alone", [])]
            keepers = {int(a): int(k) for a, k in state.get("keepers", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("the stored duplicate groups do not read back: computing them again")
            return [], {}, []
        by_anchor = {g[0]: g for g in groups if g}
        self._keepers = {
            a: (tuple(by_anchor[a]), k) for a, k in keepers.items() if a in by_anchor and k in by_anchor[a]
        }
        return groups, via, alone

    # --- reading ----------------------------------------------------------------------------------------------
    def _current(self) -> _View:
        view = self._view
        if view is None or not self._ready:
            raise GroupsNotReadyError(retry_after_s=max(1, math.ceil(self.tuning.refresh_s * 2)))
        return view

    def page(
        self,
        *,
        tier: GroupTier | None = None,
        min_size: int = 2,
        offset: int = 0,
        limit: int = 20,
        members: int | None = None,
    ) -> tuple[int, list[Group]]:
        """(groups matching, one page of them described), largest first; each with its first ``members``
        members (the keeper first; default ``tuning.list_members``)."""
        view = self._current()
        picked = [
            i for i, g in enumerate(view.groups) if len(g) >= min_size and (tier is None or view.tiers[i] == tier)
        ]
        shown = self.tuning.list_members if members is None else members
        return len(picked), [self._describe(view, i, 0, shown) for i in picked[offset : offset + limit]]

    def group(self, group_id: str, offset: int = 0, limit: int | None = None) -> Group:
        """One group, by its id or by any member's sha256; ``offset``/``limit`` page its members (the keeper
        first)."""
        view = self._current()
        index = view.where.get(group_id)
        if index is None:
            raise NotFoundError(f"no duplicate group {group_id}")
        return self._describe(view, index, offset, limit)

    def all_groups(self, tier: GroupTier | None = None) -> list[Group]:
        """Every group with every member (the CLI)."""
        view = self._current()
        chosen = [i for i in range(len(view.groups)) if tier is None or view.tiers[i] == tier]
        return [self._describe(view, i, 0, None) for i in chosen]

    def pair_homography(self, sha_a: str, sha_b: str) -> tuple[ImageFacts, ImageFacts, np.ndarray]:
        """(a, b, a's pixels -> b's pixels) for two members of one group, composed along its copy links."""
        view = self._current()
        index = view.where.get(sha_a)
        if index is None or view.where.get(sha_b) != index:
            raise NotFoundError("these two images are not in one duplicate group")
        vec_ids = view.groups[index]
        facts = {f.sha256: f for f in self.catalogue.image_facts(vec_ids).values()}
        if sha_a not in facts or sha_b not in facts:
            raise NotFoundError("these two images are not in one duplicate group")
        path = _paths_to(facts[sha_b].vec_id, self._fits(vec_ids)).get(facts[sha_a].vec_id)
        if path is None:
            if facts[sha_a].pixel_sha256 == facts[sha_b].pixel_sha256:
                return facts[sha_a], facts[sha_b], _IDENTITY
            raise NotFoundError("no chain of copy links joins these two images")
        return facts[sha_a], facts[sha_b], path[0]

    def _fits(self, vec_ids: Sequence[int], links: GroupLinks | None = None) -> dict[tuple[int, int], np.ndarray]:
        """The copy fits between the group's members (``group_links`` reads a fit for copy links only)."""
        return {
            (link.vec_id, link.other): link.homography
            for link in (self.catalogue.group_links(vec_ids) if links is None else links).inside
            if link.homography is not None
        }

    def _keeper(
        self, view: _View, index: int, facts: dict[int, ImageFacts], fits: dict[tuple[int, int], np.ndarray]
    ) -> int:
        vec_ids = view.groups[index]
        if view.decided[index]:
            return vec_ids[0]
        cached = self._keepers.get(vec_ids[0])
        if cached is not None and cached[0] == tuple(vec_ids):
            return cached[1]
        # the choice compares thumbnails (~10 ms a group): once per group, kept with the partition
        members = [facts[v] for v in vec_ids if v in facts]
        chosen = choose_keeper(members, fits, flat_margin=self._flat_margin, looks=self._looks).vec_id
        self._keepers[vec_ids[0]] = (tuple(vec_ids), chosen)
        self._dirty = True
        return chosen

    def _choose_keepers(self, deadline: float, groups: int | None = None) -> bool:
        """Choose the keepers of the groups that have none yet, in list order (the first ``groups``), until
        ``deadline``: the pages then only read them. Whether some are left."""
        view = self._view
        if view is None:
            return False
        for index, vec_ids in enumerate(view.groups[:groups]):
            if time.perf_counter() > deadline or self._stop.is_set() or self._view is not view:
                return True
            if self._has_keeper(view, index):
                continue
            links = self.catalogue.group_links(vec_ids)
            facts = self.catalogue.image_facts(vec_ids)
            if len(facts) == len(vec_ids):
                self._keeper(view, index, facts, self._fits(vec_ids, links))
        return False

    def _describe(self, view: _View, index: int, offset: int, limit: int | None) -> Group:
        vec_ids = view.groups[index]
        links = self.catalogue.group_links(vec_ids)
        facts = self.catalogue.image_facts(vec_ids)
        if len(facts) < len(vec_ids):  # removed meanwhile: the next refresh places the rest again
            vec_ids = [v for v in vec_ids if v in facts]
            if not vec_ids:
                raise NotFoundError(f"duplicate group {view.ids[index]} was removed meanwhile")
        fits = self._fits(vec_ids, links)
        chosen = self._keeper(view, index, facts, fits)
        keeper = facts[chosen] if chosen in facts else facts[vec_ids[0]]
        ordered = [keeper.vec_id, *(v for v in vec_ids if v != keeper.vec_id)]
        shown = ordered[offset : None if limit is None else offset + limit]
        paths = _paths_to(keeper.vec_id, fits)
        described = []
        for v in shown:
            m = facts[v]
            if v == keeper.vec_id:
                described.append(Member(m, "keeper", None))
            elif m.pixel_sha256 == keeper.pixel_sha256:
                described.append(Member(m, "exact", None))
            else:
                path = paths.get(v)
                edit = (
                    None
                    if path is None
                    else edit_of(
                        read_transform(path[0], (m.width, m.height), (keeper.width, keeper.height)),
                        (m.width, m.height),
                        path[1],
                    )
                )
                described.append(Member(m, "copy", edit))
        similar = _similar(links.leaving)
        similar_facts = self.catalogue.image_facts(similar) if similar else {}
        return Group(
            id=view.ids[index],
            tier=view.tiers[index],
            keeper=keeper,
            members=described,
            decided=view.decided[index],
            similar=[similar_facts[v] for v in similar if v in similar_facts],
            size=len(vec_ids),
            offset=offset,
        )

    def _looks(self, image: ImageFacts) -> np.ndarray | None:
        # JPEG decodes at 1/2, 1/4 or 1/8 size for a fraction of the work: the largest still >= _LOOK_SIDE
        side = min(_THUMBNAIL_SIDE, max(image.width, image.height))
        flag = next(
            (f for n, f in _REDUCED if side >= n * _LOOK_SIDE),
            cv2.IMREAD_COLOR,
        )
        bgr = cv2.imdecode(np.frombuffer(self.catalogue.thumbnail(image.sha256), np.uint8), flag)
        if bgr is None:
            return None
        factor = _LOOK_SIDE / max(bgr.shape[:2])
        if factor < 1:  # a caption or a colour shift still shows at this size, at a sixteenth of the pixels
            size = (max(1, round(bgr.shape[1] * factor)), max(1, round(bgr.shape[0] * factor)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        return np.asarray(bgr)

    def _flat_margin(self, image: ImageFacts, box: tuple[int, int, int, int]) -> bool:
        return flat_outside(self.catalogue.thumbnail(image.sha256), (image.width, image.height), box)


def _similar(leaving: dict[int, int], limit: int = 12) -> list[int]:
    """Images outside the group linked to a member (similar, or a copy link a decision cut), strongest first."""
    return sorted(leaving, key=lambda v: (-leaving[v], v))[:limit]


def _group_id(sha256: str) -> str:
    """A group is named after its member with the smallest content hash: stable while that member stays."""
    return sha256[:16]


# --- the API's view ----------------------------------------------------------------------------------------


def edit_summary(edit: Edit) -> str:
    """The read-out in words: only what was done (nothing for an untouched copy: 'same geometry')."""
    parts = []
    if edit.crop_fraction < 0.95:
        parts.append(f"crop {edit.crop_fraction:.0%}")
    if abs(edit.rotation) >= 1:
        parts.append(f"rotated {edit.rotation:+.0f}°")
    if edit.flip:
        parts.append("mirrored")
    if abs(edit.scale - 1) >= 0.05:
        parts.append(f"scaled ×{edit.scale:.2f}")
    if edit.border:
        parts.append("border or page added")
    return " · ".join(parts) or "same geometry (recoloured, re-encoded or text added?)"


def _image(facts: ImageFacts) -> DuplicateImage:
    return DuplicateImage(
        id=facts.entry_id,
        sha256=facts.sha256,
        url=facts.url,
        width=facts.width,
        height=facts.height,
        format=facts.format,
        nbytes=facts.nbytes,
        thumbnail_url=thumbnail_url(facts.sha256),
    )


def group_info(group: Group) -> DuplicateGroupInfo:
    keeper = group.keeper.sha256
    members = []
    for m in group.members:
        edit = None
        if m.edit is not None:
            e = m.edit
            edit = DuplicateEdit(
                crop=e.crop,
                crop_fraction=e.crop_fraction,
                scale=e.scale,
                rotation=e.rotation,
                flip=e.flip,
                border=e.border,
                hops=e.hops,
                summary=edit_summary(e),
            )
        members.append(
            DuplicateMember(
                **_image(m.facts).model_dump(),
                role=m.tier,
                edit=edit,
                evidence_url=None if m.tier == "keeper" else f"/api/explain/pair/{m.facts.sha256}/{keeper}",
            )
        )
    return DuplicateGroupInfo(
        id=group.id,
        tier=group.tier,
        size=group.size or len(group.members),
        keeper=keeper,
        decided=group.decided,
        member_offset=group.offset,
        members=members,
        similar=[_image(f) for f in group.similar],
    )
