"""The side thread that lets one search use both cores: same answers as doing it all on one thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pictrace.search.schedule import SideJob, SideThread, map_serial


@pytest.fixture
def side() -> Iterator[SideThread]:
    thread = SideThread()
    yield thread
    thread.shutdown()


def test_map_returns_every_result_in_order_computed_by_both_threads(side: SideThread) -> None:
    ran_on: dict[int, str] = {}

    def slow_square(x: int) -> int:
        ran_on[x] = threading.current_thread().name
        time.sleep(0.01)  # long enough for the side thread to take some items
        return x * x

    items = list(range(20))
    assert side.map(slow_square, items) == map_serial(slow_square, items) == [x * x for x in items]
    ran_on.clear()
    side.map(slow_square, items)
    assert sorted(ran_on) == items
    names = set(ran_on.values())
    assert any(n.startswith("pictrace-side") for n in names), names
    assert threading.current_thread().name in names, names


def test_map_waits_for_a_busy_side_thread_or_does_everything_itself(side: SideThread) -> None:
    release = threading.Event()
    busy = side.submit(release.wait)  # the side thread is taken (say, by an embedding)
    ran_on: set[str] = set()

    def record(x: int) -> int:
        ran_on.add(threading.current_thread().name)
        return x + 1

    assert side.map(record, [1, 2, 3]) == [2, 3, 4]  # returns without the side thread: it never started
    assert ran_on == {threading.current_thread().name}
    release.set()
    assert busy.result(timeout=5)


def test_errors_raised_on_either_thread_reach_the_caller(side: SideThread) -> None:
    def fail_on_seven(x: int) -> int:
        time.sleep(0.005)
        if x == 7:
            raise ValueError("seven")
        return x

    with pytest.raises(ValueError, match="seven"):
        side.map(fail_on_seven, list(range(12)))


def test_side_thread_runs_faiss_on_one_openmp_thread(side: SideThread) -> None:
    """The candidates' checks run here too: OpenMP's setting is per thread (see work.one_openmp_thread)."""
    import faiss

    assert side.submit(faiss.omp_get_max_threads).result(timeout=5) == 1


def test_a_side_job_runs_on_the_side_thread_or_is_taken_back_when_that_is_busy(side: SideThread) -> None:
    def where() -> str:
        return threading.current_thread().name

    here = threading.current_thread().name
    job = SideJob(where, side)
    time.sleep(0.05)  # the idle side thread starts it at once
    assert job.result().startswith("pictrace-side")

    release = threading.Event()
    busy = side.submit(release.wait)  # another search's embedding, say
    assert SideJob(where, side).result() == here  # not started there: done here instead of waiting
    release.set()
    assert busy.result(timeout=5)
    assert SideJob(where, None).result() == here  # no side thread: done when asked for
