"""One behaviour test class run against every catalogue engine: SQLite (default) and a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pictrace.errors import NotFoundError
from pictrace.store import (
    Catalogue,
    CatalogueStore,
    ChangePosition,
    CorruptMetaError,
    FileStat,
    LinkFit,
    Source,
    StoredImage,
)

Opener = Callable[[], Catalogue]


def stored(n: int, dim: int = 16) -> StoredImage:
    rng = np.random.default_rng(n)
    return StoredImage(
        sha256=f"{n:064x}",
        pixel_sha256=f"p{n:063x}",
        width=100 + n,
        height=50 + n,
        format="JPEG",
        nbytes=1000 + n,
        dhash=-(2**63) + n,  # the signed 64-bit extreme must round-trip
        embedding=rng.normal(size=dim).astype(np.float32),
        gray_png=b"\x89PNG gray " + bytes([n % 256]) * 10,
        orb=bytes(range(256)) * 2,
        thumbnail=b"\xff\xd8 thumb %d" % n,
    )


def source(url: str, position: int | None = None, **kw: object) -> Source:
    return Source(url=url, entry_url=kw.pop("entry_url", url), position=position, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def open_catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """A factory of connections to one fresh catalogue (several = several processes sharing it)."""
    opened: list[Catalogue] = []
    if request.param == "sqlite":

        def opener() -> Catalogue:
            opened.append(Catalogue(tmp_path / "catalogue.sqlite3"))
            return opened[-1]
    else:
        from pictrace.store.postgres import PostgresCatalogue

        url = request.getfixturevalue("postgres_url")

        def opener() -> Catalogue:
            opened.append(PostgresCatalogue(url))
            return opened[-1]

    yield opener
    for catalogue in opened:
        catalogue.close()


class TestCatalogue:
    def test_is_a_catalogue_store(self, open_catalogue: Opener) -> None:
        assert isinstance(open_catalogue(), CatalogueStore)

    def test_add_dedupes_by_sha256_and_names_by_first_source(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        image = stored(1)
        vec_id, new = cat.add_image(image, source("http://h/b.jpg", 5, entry_id="b", metadata={"k": 1}))
        assert new
        again, new_again = cat.add_image(image, source("http://h/a.jpg", 2, entry_id="a", metadata={"k": 2}))
        assert (again, new_again) == (vec_id, False)
        assert cat.has_image(image.sha256) and not cat.has_image(stored(2).sha256)
        record = cat.records([vec_id])[vec_id]
        assert (record.entry_id, record.url, record.metadata) == ("a", "http://h/a.jpg", {"k": 2})  # position 2
        assert (record.width, record.height, record.sha256) == (101, 51, image.sha256)
        assert cat.counts() == (1, 0)

    def test_features_round_trip_and_are_read_per_candidate(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        ids = [cat.add_image(stored(n), source(f"http://h/{n}.jpg", n))[0] for n in range(5)]
        assert sorted(cat.vec_ids().tolist()) == sorted(ids)
        assert dict(cat.orb_blobs_of(ids[1:3])) == {ids[1]: stored(1).orb, ids[2]: stored(2).orb}
        assert cat.grays_of([*ids[1:3], 10**6]) == {ids[1]: stored(1).gray_png, ids[2]: stored(2).gray_png}
        all_ids, vectors = zip(*cat.embeddings(batch=2), strict=True)
        got = dict(zip(np.concatenate(all_ids).tolist(), np.concatenate(vectors), strict=True))
        # float16 in the catalogue: within its precision (~3 significant digits)
        np.testing.assert_allclose(got[ids[4]], stored(4).embedding, rtol=1e-3, atol=1e-4)
        assert got[ids[4]].dtype == np.float32
        (sub_ids, sub_vectors), = list(cat.embeddings([ids[0], ids[3]]))
        assert sorted(sub_ids.tolist()) == [ids[0], ids[3]] and sub_vectors.shape == (2, 16)
        assert cat.thumbnail(stored(2).sha256) == stored(2).thumbnail
        with pytest.raises(NotFoundError):
            cat.thumbnail("e" * 64)

    def test_images_with_the_same_pixels_are_found_by_their_pixel_hash(self, open_catalogue: Opener) -> None:
        from dataclasses import replace

        cat = open_catalogue()
        first = cat.add_image(stored(1), source("http://h/1.jpg"))[0]
        twin = cat.add_image(replace(stored(2), pixel_sha256=stored(1).pixel_sha256), source("http://h/2.png"))[0]
        other = cat.add_image(stored(3), source("http://h/3.jpg"))[0]
        found = cat.same_pixels([stored(1).pixel_sha256, stored(3).pixel_sha256, "p" + "0" * 63])
        assert found == {stored(1).pixel_sha256: sorted([first, twin]), stored(3).pixel_sha256: [other]}
        assert cat.same_pixels([]) == {}

    def test_rows_of_an_older_catalogue_read_beside_compact_ones(self, open_catalogue: Opener) -> None:
        """float32 embeddings and a PNG gray per row (older catalogues) read as they were, in the same reads as
        the float16 rows and the empty gray (SSIM then reads the thumbnail) written now."""
        cat = open_catalogue()
        old, _ = cat.add_image(stored(1), source("http://h/1.jpg"))
        with cat._transaction() as conn:  # the row as an older PicTrace wrote it: raw float32
            conn.execute("UPDATE images SET embedding = ? WHERE vec_id = ?", (stored(1).embedding.tobytes(), old))
        new, _ = cat.add_image(
            StoredImage(**{**stored(2).__dict__, "gray_png": b""}), source("http://h/2.jpg")
        )
        ((ids, vectors),) = list(cat.embeddings([old, new]))
        got = dict(zip(ids.tolist(), vectors, strict=True))
        assert np.array_equal(got[old], stored(1).embedding)  # float32 then: exact
        np.testing.assert_allclose(got[new], stored(2).embedding, rtol=1e-3, atol=1e-4)
        assert cat.grays_of([old, new]) == {old: stored(1).gray_png, new: stored(2).thumbnail}

    def test_exact_matches_by_bytes_then_pixels(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        a, _ = cat.add_image(stored(1), source("http://h/1.jpg"))
        same_pixels = StoredImage(**{**stored(2).__dict__, "pixel_sha256": stored(1).pixel_sha256})
        b, _ = cat.add_image(same_pixels, source("http://h/2.png"))
        assert cat.vec_ids_by_hash(stored(2).sha256, stored(1).pixel_sha256) == [b, a]
        assert cat.vec_ids_by_hash("f" * 64, "none") == []

    def test_remove_sources_deletes_orphans_only_and_moves_the_generation(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        shared, _ = cat.add_image(stored(1), source("http://h/1.jpg"))
        cat.link_source(source("http://h/1-copy.jpg"), stored(1).sha256)
        alone, _ = cat.add_image(stored(2), source("http://h/2.jpg"))
        before = cat.generation()
        assert cat.remove_sources(["http://h/1.jpg", "http://h/2.jpg", "http://h/unknown"]) == [alone]
        assert cat.generation() > before
        assert cat.vec_ids().tolist() == [shared]
        assert cat.records([shared])[shared].url == "http://h/1-copy.jpg"
        assert cat.gallery_entry_urls() == {"http://h/1-copy.jpg": "http://h/1-copy.jpg"}
        unchanged = cat.generation()
        cat.link_source(source("http://h/1-again.jpg"), stored(1).sha256)  # no image added: no move
        assert cat.generation() == unchanged

    def test_file_stats_and_orphans_of_a_folder_gallery(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        big = 2**40 + 7  # sizes and nanosecond mtimes need 64 bits
        cat.record_file_stats([("/p/a.jpg", FileStat(10, big)), ("/p/b.jpg", FileStat(20, 1))])
        cat.record_file_stats([("/p/a.jpg", FileStat(11, big + 1))])  # re-read: replaced
        assert cat.file_stats() == {"/p/a.jpg": FileStat(11, big + 1), "/p/b.jpg": FileStat(20, 1)}
        cat.forget_file_stats(["/p/b.jpg", "/p/never.jpg"])
        assert cat.file_stats() == {"/p/a.jpg": FileStat(11, big + 1)}
        kept, _ = cat.add_image(stored(1), source("/p/a.jpg"))
        old, _ = cat.add_image(stored(2), source("/p/c.jpg"))
        cat.record_failure(source("/p/c.jpg"), "changed into something corrupt")  # its image is left behind
        before = cat.generation()
        assert cat.remove_orphans() == [old]
        assert cat.vec_ids().tolist() == [kept] and cat.generation() > before
        assert cat.remove_orphans() == []

    def test_remove_image_and_meta_deletes_move_what_they_should(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        vec_id, _ = cat.add_image(stored(7), source("http://h/7.jpg"))
        cat.link_source(source("http://h/7b.jpg"), stored(7).sha256)
        before = cat.generation()
        assert cat.remove_image(stored(7).sha256) == vec_id
        assert cat.generation() > before and cat.counts() == (0, 0) and cat.source_states() == {}
        with pytest.raises(NotFoundError):
            cat.remove_image(stored(7).sha256)
        cat.set_meta("deleted:x", "api")
        cat.delete_meta("deleted:x")
        assert cat.get_meta("deleted:x") is None

    def test_links_are_stored_both_ways_and_deleted_with_either_image(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        a, _ = cat.add_image(stored(1), source("http://h/a.jpg"))
        b, _ = cat.add_image(stored(2), source("http://h/b.jpg"))
        c, _ = cat.add_image(stored(3), source("http://h/c.jpg"))
        assert cat.unlinked() == [a, b, c]
        assert cat.add_links(a, [(b, 40), (c, 12), (a, 99), (10_000, 50)]) == 2  # not itself, not a missing one
        assert sorted(cat.links_of([a])[a]) == [(b, 40), (c, 12)]
        assert cat.links_of([b, c]) == {b: [(a, 40)], c: [(a, 12)]}  # the other way round too
        assert cat.unlinked() == [b, c]  # a's links were computed; b and c only appear in a's
        assert cat.add_links(c, []) == 0 and cat.unlinked() == [b]  # "nothing matched" is remembered too
        cat.add_links(b, [(a, 45)])  # recomputed: the newer count wins, still one row per direction
        assert sorted(cat.links_of([a])[a]) == [(b, 45), (c, 12)] and cat.links_of([b])[b] == [(a, 45)]
        cat.remove_image(stored(1).sha256)
        assert cat.links_of([a, b, c]) == {}  # gone with the image, in both directions
        assert cat.unlinked() == []  # b and c keep their "linked" mark

    def test_gallery_pages_and_evidence_reads(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        for n in range(5):
            cat.add_image(stored(n), source(f"http://h/{n}.jpg", 10 + n, entry_id=f"e{n}"))
        cat.link_source(source("http://h/first-of-2.jpg", 1, entry_id="first"), stored(2).sha256)
        page = cat.list_images(offset=1, limit=2)
        assert [(g.sha256, g.entry_id, g.sources) for g in page] == [
            (stored(1).sha256, "e1", 1),
            (stored(2).sha256, "first", 2),  # named by its first source, counting both
        ]
        assert cat.list_images(offset=5, limit=10) == []
        assert cat.orb_by_sha256(stored(3).sha256) == (stored(3).orb, 103, 53)
        with pytest.raises(NotFoundError):
            cat.orb_by_sha256("e" * 64)

    def test_failures_are_recorded_and_retried(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        bad = source("http://h/missing.jpg", 3)
        cat.record_failure(bad, "HTTP 404")
        cat.record_failure(bad, "HTTP 404 again")
        assert cat.counts() == (0, 1)
        [failure] = cat.failures()
        assert (failure.url, failure.position, failure.error) == ("http://h/missing.jpg", 3, "HTTP 404 again")
        state = cat.source_states()["http://h/missing.jpg"]
        assert (state.status, state.sha256) == ("failed", None)
        cat.add_image(stored(3), bad)
        assert cat.counts() == (1, 0) and cat.source_states()["http://h/missing.jpg"].status == "ok"

    def test_details_meta_and_local_paths(self, open_catalogue: Opener, tmp_path: Path) -> None:
        cat = open_catalogue()
        local = str(tmp_path / "photo 100%.jpg")  # a literal % must survive the placeholder translation
        vec_id, _ = cat.add_image(stored(4), source(local, 0, entry_url="photo 100%.jpg", entry_id="p"))
        cat.update_sources_details([source(local, 7, entry_url="photo 100%.jpg", entry_id="q", metadata={"t": 1})])
        record = cat.records([vec_id])[vec_id]
        assert (record.entry_id, record.url, record.location) == ("q", "photo 100%.jpg", local)
        assert record.metadata == {"t": 1}
        assert cat.local_path(stored(4).sha256) == Path(local)
        assert cat.gallery_entry_urls() == {local: "photo 100%.jpg"}
        assert cat.get_meta("backbone") is None
        cat.set_meta("backbone", "one")
        cat.set_meta("backbone", "two")
        assert cat.get_meta("backbone") == "two"

    def test_feature_identity_round_trips_as_one_meta_value(self, open_catalogue: Opener) -> None:
        cat, other_process = open_catalogue(), open_catalogue()
        assert cat.feature_identity() is None
        identity: dict[str, object] = {"backbone": "lite2", "orb_features": 500, "scales": (1.0, 0.5), "w": None}
        cat.record_feature_identity(identity)
        assert other_process.feature_identity() == {**identity, "scales": [1.0, 0.5]}  # JSON: tuples as lists
        stored_text = cat.get_meta("feature_identity")
        cat.record_feature_identity(dict(reversed(identity.items())))  # same identity, other key order
        assert cat.get_meta("feature_identity") == stored_text  # stored as the same text
        cat.record_feature_identity({"backbone": "resnet50"})  # replaced, not merged
        assert other_process.feature_identity() == {"backbone": "resnet50"}
        assert cat.get_meta("backbone") is None  # check_backbone's own keys are left alone
        for bad in ("not json", "[1, 2]"):
            cat.set_meta("feature_identity", bad)
            with pytest.raises(CorruptMetaError, match="feature_identity"):
                cat.feature_identity()
        with pytest.raises(ValueError, match=r"(?i)out of range"):
            cat.record_feature_identity({"threshold": float("nan")})  # would never compare equal again

    def test_a_failed_transaction_leaves_nothing(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        cat.add_image(stored(5), source("http://h/5.jpg"))

        def half_written() -> None:
            with cat._transaction() as conn:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("half", "written"))
                conn.execute("INSERT INTO images (sha256) VALUES (?)", ("half",))  # NOT NULL columns missing

        with pytest.raises(Exception, match=r"(?i)null|constraint"):
            half_written()
        assert cat.get_meta("half") is None
        assert cat.counts() == (1, 0) and not cat.has_image("half")
        cat.add_image(stored(6), source("http://h/6.jpg"))  # the connection is still usable
        assert cat.counts() == (2, 0)

    def test_two_writers_storing_the_same_bytes_store_them_once(self, open_catalogue: Opener) -> None:
        first, second = open_catalogue(), open_catalogue()
        results: list[tuple[int, bool]] = []
        barrier = threading.Barrier(2)

        def add(cat: Catalogue, url: str) -> None:
            barrier.wait()
            for n in range(20):
                results.append(cat.add_image(stored(100 + n), source(f"{url}/{n}.jpg")))

        threads = [threading.Thread(target=add, args=(c, u)) for c, u in ((first, "http://a"), (second, "http://b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(new for _, new in results) == 20
        assert first.counts() == (20, 0) and len(first.source_states()) == 40
        assert second.generation() == 20

    def test_every_add_and_delete_is_logged_with_the_generation_it_made(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        start = cat.change_position()
        a, _ = cat.add_image(stored(1), source("http://h/1.jpg"))
        b, _ = cat.add_image(stored(2), source("http://h/2.jpg"))
        cat.add_image(stored(2), source("http://h/2-copy.jpg"))  # not new: no row
        cat.link_source(source("http://h/1-copy.jpg"), stored(1).sha256)
        cat.remove_sources(["http://h/2.jpg", "http://h/2-copy.jpg", "http://h/1.jpg"])  # b orphaned, a kept
        cat.remove_image(stored(1).sha256)
        changes = cat.changes_after(start.seq)
        assert [(c.vec_id, c.op, c.generation - start.generation) for c in changes] == [
            (a, "add", 1), (b, "add", 2), (b, "remove", 3), (a, "remove", 4)
        ]
        assert [c.seq for c in changes] == sorted(c.seq for c in changes)
        assert cat.change_position() == ChangePosition(changes[-1].seq, cat.generation())
        assert cat.changes_after(changes[1].seq) == changes[2:]
        assert dict(cat.orb_blobs_of([a, b])) == {}  # both deleted
        c, _ = cat.add_image(stored(3), source("http://h/3.jpg"))
        assert dict(cat.orb_blobs_of([c, a])) == {c: stored(3).orb}
        assert cat.trim_change_log(changes[-1].seq) == 4
        assert [x.vec_id for x in cat.changes_after(0)] == [c]

    def test_concurrent_writers_log_in_commit_order(self, open_catalogue: Opener) -> None:
        """seq order is generation order, also with writers racing on PostgreSQL (the bump's row lock orders
        the seqs): a replica that read up to a seq never finds an older seq committed after it."""
        first, second = open_catalogue(), open_catalogue()
        barrier = threading.Barrier(2)

        def add(cat: Catalogue, offset: int) -> None:
            barrier.wait()
            for n in range(25):
                cat.add_image(stored(offset + n), source(f"http://h/{offset + n}.jpg"))

        threads = [threading.Thread(target=add, args=(c, o)) for c, o in ((first, 100), (second, 200))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        generations = [c.generation for c in first.changes_after(0)]
        assert generations == list(range(1, 51))

    def test_a_catalogue_made_before_the_change_log_gets_one(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        cat.add_image(stored(1), source("http://h/1.jpg"))
        with cat._transaction() as conn:  # what an older PicTrace left: no change_log table
            conn.execute("DROP TABLE change_log")
        reopened = open_catalogue()
        assert reopened.changes_after(0) == [] and reopened.change_position() == ChangePosition(0, 1)
        vec_id, _ = reopened.add_image(stored(2), source("http://h/2.jpg"))
        assert [(c.vec_id, c.op, c.generation) for c in reopened.changes_after(0)] == [(vec_id, "add", 2)]

    def test_links_keep_verdict_and_homography_and_decisions_are_kept(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        a, _ = cat.add_image(stored(1), source("http://h/a.jpg"))
        b, _ = cat.add_image(stored(2), source("http://h/b.jpg"))
        assert cat.last_vec_id() == b > a and cat.vec_ids_after(a) == [b] and cat.vec_ids_after(0) == [a, b]
        hom = np.array([[2.0, 0, 10], [0, 2.0, 20], [0, 0, 1]])
        before = cat.link_generation()
        assert cat.add_links(a, [LinkFit(b, 60, "copy", 0.9, hom)]) == 1
        assert cat.link_generation() > before
        cat.add_links(b, [LinkFit(a, 20, "similar", 0.7, hom)])  # b matched a again: the latest verdict stays
        assert cat.links_of([a, b]) == {a: [(b, 20)], b: [(a, 20)]} and cat.copy_fits() == []
        cat.add_links(a, [LinkFit(b, 60, "copy", 0.9, hom)])
        # what the duplicate groups read: the copy links with their fits (all, or those touching some images),
        # a tally to notice a change, and each image's size
        for fits in (cat.copy_fits(), cat.copy_fits([a]), cat.copy_fits([b]), cat.copy_fits([b, a])):
            assert [(x, y, n) for x, y, n, _ in fits] == [(a, b, 60)] and np.allclose(fits[0][3], hom)
        assert cat.copy_fits([999]) == [] and cat.copy_tally() == (1, 60)
        shapes = {v: rest for v, *rest in cat.image_shapes()}
        assert set(shapes) == {a, b} and cat.image_shapes([b]) == [(b, *shapes[b])]
        assert shapes[a][0] == stored(1).sha256
        both = cat.group_links([a, b])
        there, back = sorted(both.inside, key=lambda link: link.vec_id)
        assert (there.tier, there.cosine) == ("copy", pytest.approx(0.9)) and both.leaving == {}
        assert there.homography is not None and back.homography is not None
        assert np.allclose(there.homography, hom) and np.allclose(back.homography @ hom, np.eye(3), atol=1e-5)
        one = cat.group_links([a])  # a link leaving the images asked for: only its strength
        assert one.inside == [] and one.leaving == {b: 60}
        sha_a, sha_b = stored(1).sha256, stored(2).sha256
        cat.decide_distinct(sha_b, sha_a)
        cat.decide_keep(sha_a)
        assert cat.decisions() == ([tuple(sorted((sha_a, sha_b)))], [sha_a])
        cat.remove_image(sha_a)  # decisions are by content: they outlive the image
        assert cat.decisions()[1] == [sha_a] and cat.vec_ids_of([sha_a, sha_b]) == {sha_b: b}

    def test_links_of_an_older_catalogue_get_the_new_columns_and_are_linked_again(self, open_catalogue: Opener) -> None:
        cat = open_catalogue()
        a, _ = cat.add_image(stored(1), source("http://h/a.jpg"))
        b, _ = cat.add_image(stored(2), source("http://h/b.jpg"))
        with cat._transaction() as conn:  # what an older PicTrace left: links without verdict, cosine or fit
            conn.execute("DROP TABLE links")
            conn.execute(
                """CREATE TABLE links (vec_id BIGINT NOT NULL, other BIGINT NOT NULL, inliers INTEGER NOT NULL,
                   PRIMARY KEY (vec_id, other))"""
            )
            conn.executemany(
                "INSERT INTO links (vec_id, other, inliers) VALUES (?, ?, ?)", [(a, a, 0), (a, b, 40), (b, a, 40)]
            )
        reopened = open_catalogue()
        assert reopened.links_of([a]) == {a: [(b, 40)]}  # still used by the search meanwhile
        assert reopened.unlinked() == [a, b]  # the next ingest links them again, with verdicts
        reopened.add_links(a, [LinkFit(b, 41, "copy", 0.8, np.eye(3))])
        assert [fit[:3] for fit in reopened.copy_fits()] == [(min(a, b), max(a, b), 41)]
