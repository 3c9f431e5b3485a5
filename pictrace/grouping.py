"""Which images are copies of which: the duplicate groups' partition, from the match graph's stored copy links.

A copy link says two images share a picture, not that they *are* one: a collage holding a crop of photo A and
a crop of photo B is rightly linked to both, and two crops of one photo to each other. Joining copy links
transitively (union-find) chained 9,005 of a 10k real-content gallery's images into one group through such
collages (docs/duplicates.md). So a group here is a **star**: one anchor, and members that are each a copy of
the anchor by the homography that joins them to it:

* a member's frame lies inside the anchor's (a crop, a rescaled, turned, mirrored or recoloured copy), or the
  anchor's frame lies inside the member's (a border, a page or a screenshot around it): at least
  ``containment`` of the one frame's area lands in the other (the stored fit, extended over the frame);
* it is linked to the anchor directly, or through one member that itself lies inside the anchor (at most
  ``max_hops`` links composed); a member reached through another must lie inside the anchor, and its pixels
  must agree with the anchor's where the composed map puts it (``looks_alike``, given by the owner: the
  thumbnails). A homography is fitted on the part two images share and extends over the whole frame, so a
  collage linked to the anchor through one of its tiles may "lie inside" it by its other tiles' extension, and
  a picture reached through that collage would be read in the anchor's frame through a map fitted on another
  picture: the pixels say it does not show what the anchor shows there.

Anchors are chosen greedily, the fullest first: a person's "keep this one" first, then images no other image
contains, then those that contain the most others, then the most pixels and bytes; each anchor takes every
image not yet placed that is a copy of it. A weak link (fewer than ``join_min_inliers``: look-alike product
shots share such near-identity fits) brings in only an image that has no strong link at all. A pair decided
"not duplicates" is never in one group.

The partition is kept up to date incrementally: new images and links are placed (attached to a group, or
anchoring a new one) without regrouping the rest; a removed image, a removed link or a decision releases only
the groups it touches, whose members are placed again. Placement is greedy, so the result depends on arrival
order: the owner places an ingest run's images again together once it has ended, and persists the partition
(pictrace/duplicates.py) so that a restart reads back the same groups. Pure: no catalogue, no threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_GRID = 8  # points a side sampled over a frame to measure the share of it that lands inside another frame
_CELLS = _GRID * _GRID
_IDENTITY = np.eye(3)
_EXACT = 1 << 30  # same decoded pixels: stronger than any fit


@functools.cache
def _unit_grid() -> np.ndarray:
    """Cell centres of an 8 x 8 grid over the unit square, as homogeneous columns (3 x 64)."""
    cells = (np.arange(_GRID) + 0.5) / _GRID
    gx, gy = np.meshgrid(cells, cells)
    return np.stack([gx.ravel(), gy.ravel(), np.ones(_GRID * _GRID)])


def inside_shares(homs: np.ndarray, sizes_a: np.ndarray, sizes_b: np.ndarray) -> np.ndarray:
    """For each homography (a's pixels -> b's), the share of a's frame it maps inside b's frame: the centres of
    an 8 x 8 grid of cells over a, counted (vectorised; a 100k gallery's links in about a second)."""
    count = len(homs)
    out = np.zeros(count)
    unit = _unit_grid()
    for start in range(0, count, 8192):
        part = slice(start, start + 8192)
        homs_part = np.asarray(homs[part], dtype=np.float64)
        frame = np.zeros((len(homs_part), 3, 3))
        frame[:, 0, 0] = sizes_a[part, 0]
        frame[:, 1, 1] = sizes_a[part, 1]
        frame[:, 2, 2] = 1.0
        points = homs_part @ frame @ unit
        w = points[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            x, y = points[:, 0] / w, points[:, 1] / w
            inside = (w > 0) & (x >= 0) & (y >= 0) & (x <= sizes_b[part, 0, None]) & (y <= sizes_b[part, 1, None])
        out[part] = inside.mean(axis=1)
    return out


def inside_share(hom: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """One homography's share (see :func:`inside_shares`)."""
    points = (hom * np.array([size_a[0], size_a[1], 1.0])) @ _unit_grid()
    w = points[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = points[0] / w, points[1] / w
        inside = (w > 0) & (x >= 0) & (y >= 0) & (x <= size_b[0]) & (y <= size_b[1])
    return float(inside.mean())


@dataclass(frozen=True, slots=True)
class Shape:
    """What grouping knows of an image."""

    width: int
    height: int
    nbytes: int
    pixel_sha256: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(slots=True)
class _Link:
    """A million images hold millions of links: slots, the fit as the catalogue's 36 bytes rather than an array
    (an array object and its view of a stacked array took 200 bytes), and the frame shares in grid cells."""

    a: int
    b: int
    inliers: int
    fit: bytes  # a's pixels -> b's, 3x3 float32 (as the catalogue stores it)
    a_in_b: int  # the share of a's frame inside b's, in cells of the 8 x 8 grid (a small int: no object)
    b_in_a: int

    @property
    def hom(self) -> np.ndarray:
        return np.frombuffer(self.fit, dtype=np.float32).astype(np.float64).reshape(3, 3)

    def other(self, v: int) -> int:
        return self.b if v == self.a else self.a

    def to(self, v: int) -> np.ndarray:
        """The map from the other end's pixels to v's."""
        return self.hom if v == self.b else np.linalg.inv(self.hom)

    def inside(self, v: int) -> float:
        """The share of v's frame inside the other end's."""
        return (self.a_in_b if v == self.a else self.b_in_a) / _CELLS


class Grouping:
    """The partition of one gallery's linked images into star groups, kept up to date by the calls below."""

    def __init__(
        self,
        containment: float = 0.8,
        join_min_inliers: int = 40,
        max_hops: int = 2,
        looks_alike: Callable[[int, int, np.ndarray], bool] | None = None,
    ) -> None:
        self.containment = containment
        self.join_min_inliers = join_min_inliers
        self.max_hops = max_hops
        # (member, anchor, member's pixels -> anchor's): whether their pixels agree there, asked of a member
        # reached through another one (the map is composed, and may have been extended over a collage)
        self.looks_alike = looks_alike
        self._trusted = False  # restoring a stored partition: its joins were checked when they were made
        self.shapes: dict[int, Shape] = {}
        self._near: dict[int, dict[int, _Link]] = {}  # each link under both its ends
        self._strong: dict[int, int] = {}  # strong links an image has
        self._holds: dict[int, int] = {}  # images (strongly linked) whose frame lies inside it
        self._held: dict[int, int] = {}  # images (strongly linked) it lies inside, and not they in it
        self.anchor_of: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}  # anchor -> its group, the anchor first
        self._to_anchor: dict[int, np.ndarray] = {}
        self._hops: dict[int, int] = {}
        self._inside: dict[int, bool] = {}  # the member's frame lies inside the anchor's
        self._via: dict[int, int] = {}  # the member it joined through (the anchor, or one inside it)
        self.apart: dict[int, set[int]] = {}
        self.kept: set[int] = set()
        self._tally = [0, 0]

    # --- what the catalogue holds ---------------------------------------------------------------------------
    def add_images(self, shapes: dict[int, Shape], twins: Mapping[str, Sequence[int]] | None = None) -> set[int]:
        """Know these images; those that share their decoded pixels with another are linked to the first one
        known (exact). ``twins``: the images with each new image's pixels, by vec_id, where the caller can look
        them up (the catalogue indexes them); without it every known image is read for them (~0.2 s at 100k)."""
        if twins is None:
            by_pixels: dict[str, list[int]] = {}
            for v, shape in [*self.shapes.items(), *sorted(shapes.items())]:
                by_pixels.setdefault(shape.pixel_sha256, []).append(v)
            twins = by_pixels
        touched: set[int] = set()
        for v, shape in sorted(shapes.items()):
            if v in self.shapes:
                continue
            known = next((t for t in twins.get(shape.pixel_sha256, ()) if t in self.shapes), None)
            self.shapes[v] = shape
            if known is not None:
                touched |= self.add_links([(known, v, _EXACT, _IDENTITY)])
        return touched

    def add_links(self, links: Iterable[tuple[int, int, int, np.ndarray | None]]) -> set[int]:
        """Know these copy links ``(a, b, inliers, a's pixels -> b's)`` (one replaces the pair's earlier one);
        returns the images to place again (call :meth:`place`)."""
        fresh = [
            (min(a, b), max(a, b), n, hom if a < b else np.linalg.inv(hom))
            for a, b, n, hom in links
            if hom is not None and a != b and a in self.shapes and b in self.shapes
        ]
        if not fresh:
            return set()
        touched: set[int] = set()
        unchanged = set()
        for a, b, n, hom in fresh:
            known = self._near.get(a, {}).get(b)
            # the fit as it would be kept: a link read again from the catalogue has the very same bytes (a
            # million links are read again after an ingest run; np.allclose took 15 s of them at 100k images)
            if known is not None and known.inliers == n and known.fit == np.asarray(hom, np.float32).tobytes():
                unchanged.add((a, b))
            elif known is not None:
                touched |= self.remove_link(a, b)
        fresh = [f for f in fresh if (f[0], f[1]) not in unchanged]
        if not fresh:
            return touched
        homs = np.stack([np.asarray(h, dtype=np.float64) for *_, h in fresh])
        size_a = np.array([self.shapes[a].size for a, *_ in fresh], dtype=float)
        size_b = np.array([self.shapes[b].size for _, b, *_ in fresh], dtype=float)
        shares = np.stack([inside_shares(homs, size_a, size_b), inside_shares(np.linalg.inv(homs), size_b, size_a)])
        cells = np.rint(shares * _CELLS).astype(int).tolist()
        fits = homs.astype(np.float32)
        for (a, b, n, _), fit, ab, ba in zip(fresh, fits, *cells, strict=True):
            link = _Link(a, b, int(n), fit.tobytes(), ab, ba)
            self._near.setdefault(a, {})[b] = link
            self._near.setdefault(b, {})[a] = link
            self._count(link, +1)
            touched |= {a, b}
        return touched

    def tally(self) -> tuple[int, int]:
        """(copy links known, their inliers summed), as the catalogue's ``copy_tally`` counts them."""
        return self._tally[0], self._tally[1]

    def stored_pairs(self) -> set[tuple[int, int]]:
        """The pairs of the known copy links that came from the catalogue (not the same-pixel ones)."""
        near = self._near.items()
        return {(a, b) for a, links in near for b, link in links.items() if a < b and link.inliers != _EXACT}

    def remove_link(self, a: int, b: int) -> set[int]:
        link = self._near.get(a, {}).pop(b, None)
        if link is None:
            return set()
        self._near[b].pop(a, None)
        self._count(link, -1)
        if self._via.get(link.a) == link.b or self._via.get(link.b) == link.a:
            return self.release(link.a)  # the link that put one of them in the group
        return set()

    def remove_images(self, vec_ids: Iterable[int]) -> set[int]:
        """Forget these images and their links; returns the images whose groups they were in, to place again."""
        gone = {v for v in vec_ids if v in self.shapes}
        released: set[int] = set()
        for v in gone:
            released |= self.release(v)
        for v in gone:
            for other in list(self._near.get(v, {})):
                self.remove_link(v, other)
            self._near.pop(v, None)
            del self.shapes[v]
            for mapping in (self._strong, self._holds, self._held):
                mapping.pop(v, None)
        return released - gone

    def _count(self, link: _Link, step: int) -> None:
        if link.inliers != _EXACT:
            self._tally[0] += step
            self._tally[1] += step * link.inliers
        if link.inliers < self.join_min_inliers:
            return
        c = self.containment
        for v in (link.a, link.b):
            self._strong[v] = self._strong.get(v, 0) + step
        for v in (link.a, link.b):
            other = link.other(v)
            if link.inside(other) >= c:
                self._holds[v] = self._holds.get(v, 0) + step
            if link.inside(v) >= c > link.inside(other):
                self._held[v] = self._held.get(v, 0) + step

    # --- decisions ------------------------------------------------------------------------------------------
    def set_decisions(self, apart: Iterable[tuple[int, int]], kept: Iterable[int]) -> set[int]:
        """People's decisions: pairs never in one group, images that anchor their group. Returns the images to
        place again (the groups a new decision touches)."""
        new_apart: dict[int, set[int]] = {}
        for a, b in apart:
            new_apart.setdefault(a, set()).add(b)
            new_apart.setdefault(b, set()).add(a)
        new_kept = set(kept)
        touched: set[int] = set()
        for a, others in new_apart.items():
            for b in others - self.apart.get(a, set()):
                if a in self.anchor_of and self.anchor_of[a] == self.anchor_of.get(b):
                    touched |= self.release(a)
        for v in new_kept ^ self.kept:
            touched |= self.release(v)
        self.apart, self.kept = new_apart, new_kept
        return touched

    # --- the partition --------------------------------------------------------------------------------------
    def release(self, v: int) -> set[int]:
        """Dissolve the group v is in; its images are unplaced (returned)."""
        anchor = self.anchor_of.get(v)
        if anchor is None:
            return {v} if v in self.shapes else set()
        group = self.members.pop(anchor)
        for m in group:
            for mapping in (self.anchor_of, self._to_anchor, self._hops, self._inside, self._via):
                mapping.pop(m, None)
        return set(group)

    def key(self, v: int) -> tuple[int, int, int, int, int, int, int]:
        """Anchors first: kept, strongly linked, contained by none, containing most, most pixels, bytes."""
        shape = self.shapes[v]
        return (
            v not in self.kept,
            self._strong.get(v, 0) == 0,
            self._held.get(v, 0) > 0,
            -self._holds.get(v, 0),
            -shape.width * shape.height,
            -shape.nbytes,
            v,
        )

    def place(self, vec_ids: Iterable[int]) -> None:
        """Place each unplaced image among ``vec_ids`` that has a link: into a group it is a copy of the anchor
        of, or as the anchor of a new one, the fullest first. An anchor left alone is dissolved again when a
        later image links to it, so that it may join that image's group."""
        pending: set[int] = set()
        for v in vec_ids:
            if v not in self.shapes or not self._near.get(v):
                continue
            anchor = self.anchor_of.get(v)
            if anchor is not None and len(self.members[anchor]) == 1:
                self.release(v)
            if v not in self.anchor_of:
                pending.add(v)
        strong = [v for v in pending if self._strong.get(v, 0) > 0 or v in self.kept]
        for v in sorted(strong, key=self.key):
            if v in self.anchor_of:
                continue
            if v not in self.kept and self._attach(v):
                continue
            self._anchor(v, weak=False)
        # images with weak links only, their strongest link first (as links are read in union-find): a
        # look-alike pairs with its own look-alike before it would join another picture's group
        weak = sorted(
            (v for v in pending if v not in self.anchor_of),
            key=lambda v: (-max(link.inliers for link in self._near[v].values()), v),
        )
        for v in weak:
            if v in self.anchor_of:
                continue
            if not self._attach(v, pair=True):
                self._anchor(v, weak=True)

    def _attach(self, v: int, pair: bool = False) -> bool:
        """Join v to the group of an image it is linked to, its strongest link first; with ``pair``, a weak
        image may instead anchor a new group with another weak one that is not placed yet."""
        alone = self._strong.get(v, 0) == 0
        for other, link in sorted(self._near[v].items(), key=lambda kv: (-kv[1].inliers, kv[0])):
            if link.inliers < self.join_min_inliers and not alone:
                continue
            if other not in self.anchor_of:
                if pair and self._strong.get(other, 0) == 0:
                    first = min(v, other, key=self.key)
                    self._anchor(first, weak=True)
                    if self.anchor_of.get(v) is not None and self.anchor_of.get(other) is not None:
                        return True
                    self.release(first)
                continue
            if self._join(v, other, link):
                return True
        return False

    def _anchor(self, anchor: int, weak: bool) -> None:
        """Make an image the anchor of a new group, and take in every unplaced copy of it; through weak links
        only with ``weak`` (the images that have no strong link are placed after all the others)."""
        self._seat(anchor)
        queue = [anchor]
        while queue:
            via = queue.pop(0)
            if not self._leads(via):
                continue
            for other, link in sorted(self._near[via].items(), key=lambda kv: (-kv[1].inliers, kv[0])):
                if other in self.kept or (other in self.anchor_of and not self._alone(other)):
                    continue
                if link.inliers < self.join_min_inliers and (not weak or self._strong.get(other, 0) > 0):
                    continue
                was_alone = other in self.anchor_of
                if was_alone:  # an image no group took so far: this one may
                    self.release(other)
                if self._join(other, via, link):
                    queue.append(other)
                elif was_alone:
                    self._seat(other)  # alone, as it was

    def _seat(self, anchor: int) -> None:
        """A group of one: the anchor alone."""
        self.anchor_of[anchor] = anchor
        self.members[anchor] = [anchor]
        self._to_anchor[anchor] = _IDENTITY
        self._hops[anchor] = 0
        self._inside[anchor] = True

    def _alone(self, v: int) -> bool:
        """An anchor no other image joined."""
        return self.anchor_of.get(v) == v and len(self.members[v]) == 1

    def _leads(self, via: int) -> bool:
        """Whether images may join a group through this member: the anchor, or a member inside it, near it."""
        return self.anchor_of[via] == via or (self._inside[via] and self._hops[via] < self.max_hops)

    def _join(self, v: int, via: int, link: _Link) -> bool:
        """Put v in via's group when the composed map says v is a copy of the anchor (see the module doc)."""
        anchor = self.anchor_of[via]
        if not self._leads(via):
            return False
        if any(self.anchor_of.get(x) == anchor for x in self.apart.get(v, ())):
            return False
        to_anchor = self._to_anchor[via] @ link.to(via)
        shape, anchor_shape = self.shapes[v].size, self.shapes[anchor].size
        c = self.containment
        v_inside = (link.inside(v) if via == anchor else inside_share(to_anchor, shape, anchor_shape)) >= c
        if not v_inside:
            if via != anchor:
                return False  # reached through a member: it must lie inside the anchor
            if link.inside(anchor) < c:
                return False
        checked = via != anchor and self.looks_alike is not None and not self._trusted
        if checked and self.looks_alike is not None and not self.looks_alike(v, anchor, to_anchor):
            return False
        self.anchor_of[v] = anchor
        self.members[anchor].append(v)
        self._to_anchor[v] = to_anchor
        self._hops[v] = self._hops[via] + 1
        self._inside[v] = v_inside
        self._via[v] = via
        return True

    def restore(
        self, groups: Iterable[list[int]], via: dict[int, int] | None = None, alone: Iterable[int] = ()
    ) -> set[int]:
        """Take back a persisted partition: its groups (anchor first), the member each member joined through
        (``via``: the same maps to the anchor, composed along the same links), and the anchors no image joined.
        A group that no longer holds together (an image or a link gone) is released. Returns the images left to
        place (call :meth:`place` with them and the images the partition did not know)."""
        via = via or {}
        loose: set[int] = set()
        self._trusted = True
        for v in alone:
            if v in self.shapes and v not in self.anchor_of:
                self._seat(v)
        for group in groups:
            present = [v for v in group if v in self.shapes]
            if len(present) < 2 or present[0] != group[0] or any(v in self.kept for v in present[1:]):
                loose |= set(present)
                continue
            anchor = present[0]
            self._seat(anchor)
            wanted = {v: via.get(v, anchor) for v in present[1:]}
            while wanted:
                ready = [v for v, through in wanted.items() if self.anchor_of.get(through) == anchor]
                joined = [
                    v
                    for v in sorted(ready)
                    if (link := self._near.get(v, {}).get(wanted[v])) and self._join(v, wanted[v], link)
                ]
                for v in ready:
                    del wanted[v]
                if len(joined) < len(ready) or not ready:
                    break
            if wanted or any(self.anchor_of.get(v) != anchor for v in present):
                loose |= self.release(anchor)
        self._trusted = False
        return loose

    def vias(self) -> dict[int, int]:
        """The member each grouped image joined through (the anchor, or a member inside it)."""
        return dict(self._via)

    def groups(self) -> Iterator[list[int]]:
        """Every group of two or more, the anchor first."""
        return (g for g in self.members.values() if len(g) > 1)

    def alone(self) -> list[int]:
        """The anchors no image joined (placed: a later link to them places them again)."""
        return sorted(a for a, g in self.members.items() if len(g) == 1)

    def hops(self, v: int) -> int:
        return self._hops.get(v, 0)
