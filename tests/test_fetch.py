"""Fetcher against a real, misbehaving aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from resolvers import MapResolver

from pictrace.config import Settings
from pictrace.errors import FetchError, OverloadedError, TooLargeError, UnsafeURLError
from pictrace.fetch import Fetcher
from pictrace.tuning import Fetching

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # opaque bytes: fetch.py never decodes
CAP = 64 * 1024
ENDLESS_CHUNK = 64 * 1024
ENDLESS_LIMIT = 512 * 1024 * 1024  # what /endless would send to a client that never stops reading


def resolver() -> MapResolver:
    return MapResolver(
        {
            "test-host.test": ["127.0.0.1"],
            "evil.test": ["127.0.0.1"],
            "mixed.test": ["93.184.216.34", "127.0.0.1"],
            "gallery-a.test": ["127.0.0.1"],
            "gallery-b.test": ["127.0.0.1"],
        }
    )


def settings(**overrides: object) -> Settings:
    """Small limits so every failure shows up in well under a second or two."""
    values: dict[str, object] = {
        "fetch_timeout_s": 1.0,
        "fetch_connect_timeout_s": 1.0,
        "fetch_retries": 2,
        "fetch_concurrency": 16,
        "fetch_per_host": 4,
        "max_download_bytes": CAP,
        "fetch_allow": [],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@dataclass
class Server:
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    user_agents: list[str] = field(default_factory=list)
    endless_sent: int = 0
    endless_done: asyncio.Event = field(default_factory=asyncio.Event)
    trickled: int = 0
    active: int = 0
    max_active: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _closed(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def build_app(state: Server) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def count(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
        state.hits[request.path] += 1
        state.user_agents.append(request.headers.get("User-Agent", ""))
        return await handler(request)  # type: ignore[no-any-return, misc]

    @routes.get("/ok")
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    @routes.get("/missing")
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    @routes.get("/flaky")
    async def flaky(request: web.Request) -> web.Response:
        if state.hits["/flaky"] == 1:
            return web.Response(status=500, text="boom")
        return web.Response(body=IMAGE)

    @routes.get("/always500")
    async def always500(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    @routes.get("/throttled")
    async def throttled(request: web.Request) -> web.Response:
        if state.hits["/throttled"] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(body=IMAGE)

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=IMAGE)

    @routes.get("/slowloris")
    async def slowloris(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(40):
            if _closed(request):
                break
            await resp.write(b"x")
            state.trickled += 1
            await asyncio.sleep(0.1)
        return resp

    @routes.get("/endless")
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"\0" * ENDLESS_CHUNK
        try:
            while state.endless_sent < ENDLESS_LIMIT and not _closed(request):
                await resp.write(chunk)
                state.endless_sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            state.endless_done.set()
        return resp

    @routes.get("/biglen")
    async def biglen(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10**9
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        for _ in range(50):  # then hang: a client that tries to read it would time out instead
            if _closed(request):
                break
            await asyncio.sleep(0.1)
        return resp

    @routes.get("/shortlen")
    async def shortlen(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1000
        resp.force_close()
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        return resp

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    @routes.get("/loop/a")
    async def loop_a(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop/b")

    @routes.get("/loop/b")
    async def loop_b(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/loop/a")

    @routes.get("/chain/{n}")
    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=IMAGE)
        raise web.HTTPTemporaryRedirect(f"/chain/{n - 1}")

    @routes.get("/hold")
    async def hold(request: web.Request) -> web.Response:
        state.active += 1
        state.max_active = max(state.max_active, state.active)
        try:
            await asyncio.sleep(0.15)
        finally:
            state.active -= 1
        return web.Response(body=IMAGE)

    app = web.Application(middlewares=[count])
    app.add_routes(routes)
    return app


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    runner = web.AppRunner(build_app(state), handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


def constants(max_redirects: int = 3) -> Fetching:
    return Fetching(max_redirects=max_redirects, user_agent="PicTraceTest/9.9")


@contextlib.asynccontextmanager
async def open_fetcher(s: Settings, **kwargs: Any) -> AsyncIterator[Fetcher]:
    """A started Fetcher with the test resolver and a tiny backoff (settings differ per test)."""
    kwargs.setdefault("constants", constants())
    kwargs.setdefault("resolver", resolver())
    kwargs.setdefault("backoff_base_s", 0.01)
    async with Fetcher(s, **kwargs) as fetcher:
        yield fetcher


# --- gallery: trusted, retried ---------------------------------------------------------------------------


async def test_gallery_ok_sends_user_agent(server: Server) -> None:
    async with open_fetcher(settings()) as fetcher:
        body = await fetcher.fetch_gallery(server.url("/ok"))
    assert body == IMAGE
    assert server.user_agents == ["PicTraceTest/9.9"]


async def test_gallery_404_is_not_retried(server: Server) -> None:
    url = server.url("/missing")
    async with open_fetcher(settings()) as fetcher:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch_gallery(url)
    assert info.value.status == 404
    assert str(info.value) == f"HTTP 404 from {url}"
    assert server.hits["/missing"] == 1


async def test_gallery_retries_500_then_succeeds(server: Server) -> None:
    async with open_fetcher(settings(fetch_retries=2)) as fetcher:
        assert await fetcher.fetch_gallery(server.url("/flaky")) == IMAGE
    assert server.hits["/flaky"] == 2


async def test_gallery_gives_up_after_retries(server: Server) -> None:
    async with open_fetcher(settings(fetch_retries=2)) as fetcher:
        with pytest.raises(FetchError, match="gave up after 3 attempts") as info:
            await fetcher.fetch_gallery(server.url("/always500"))
    assert info.value.status == 503
    assert server.hits["/always500"] == 3


async def test_gallery_no_retries_when_configured(server: Server) -> None:
    async with open_fetcher(settings(fetch_retries=0)) as fetcher:
        with pytest.raises(FetchError, match="HTTP 503"):
            await fetcher.fetch_gallery(server.url("/always500"))
    assert server.hits["/always500"] == 1


async def test_gallery_honours_retry_after(server: Server) -> None:
    async with open_fetcher(settings(), retry_after_cap_s=5.0) as fetcher:
        started = time.monotonic()
        assert await fetcher.fetch_gallery(server.url("/throttled")) == IMAGE
        elapsed = time.monotonic() - started
    assert server.hits["/throttled"] == 2
    assert 0.9 <= elapsed < 3.0


async def test_gallery_retry_after_is_capped(server: Server) -> None:
    async with open_fetcher(settings(), retry_after_cap_s=0.05) as fetcher:
        started = time.monotonic()
        assert await fetcher.fetch_gallery(server.url("/throttled")) == IMAGE
    assert time.monotonic() - started < 0.8


async def test_gallery_connection_refused() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with open_fetcher(settings(fetch_retries=1)) as fetcher:
        with pytest.raises(FetchError, match=r"cannot connect to 127\.0\.0\.1") as info:
            await fetcher.fetch_gallery(f"http://127.0.0.1:{port}/x.jpg")
    assert info.value.retryable is True
    assert "gave up after 2 attempts" in str(info.value)


async def test_gallery_unknown_host() -> None:
    async with open_fetcher(settings(fetch_retries=0)) as fetcher:
        with pytest.raises(FetchError, match=r"cannot resolve host nowhere\.test"):
            await fetcher.fetch_gallery("http://nowhere.test/x.jpg")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/db.json", "file:///etc/passwd", "http:///x"])
async def test_gallery_refuses_other_schemes(url: str) -> None:
    async with open_fetcher(settings()) as fetcher:
        with pytest.raises(UnsafeURLError):
            await fetcher.fetch_gallery(url)


async def test_gallery_follows_redirects_within_limit(server: Server) -> None:
    async with open_fetcher(settings(), constants=constants(max_redirects=3)) as fetcher:
        assert await fetcher.fetch_gallery(server.url("/chain/3")) == IMAGE
        with pytest.raises(FetchError, match="too many redirects"):
            await fetcher.fetch_gallery(server.url("/chain/5"))


# --- limits: time and bytes ------------------------------------------------------------------------------


async def test_slow_server_times_out(server: Server) -> None:
    async with open_fetcher(settings(fetch_timeout_s=0.5, fetch_retries=0)) as fetcher:
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"timed out after 0.5s") as info:
            await fetcher.fetch_gallery(server.url("/slow"))
    assert time.monotonic() - started < 1.5
    assert info.value.retryable is True


async def test_slowloris_hits_total_timeout(server: Server) -> None:
    """Bytes keep arriving (so no read timeout would fire), yet the total budget still ends it."""
    async with open_fetcher(settings(fetch_timeout_s=1.0, fetch_allow=["test-host.test"])) as fetcher:
        started = time.monotonic()
        with pytest.raises(FetchError, match="timed out"):
            await fetcher.fetch_user(server.url("/slowloris", host="test-host.test"))
    assert time.monotonic() - started < 2.0
    assert server.trickled >= 5


async def test_endless_body_stops_at_cap(server: Server) -> None:
    s = settings(fetch_allow=["127.0.0.1"], fetch_timeout_s=5.0)
    async with open_fetcher(s) as fetcher:
        with pytest.raises(TooLargeError, match=f"more than the {CAP}-byte limit"):
            await fetcher.fetch_user(server.url("/endless"))
    # The client hung up: the server's writes fail soon, long before it ran out of data to send.
    await asyncio.wait_for(server.endless_done.wait(), timeout=5)
    assert server.endless_sent < 32 * 1024 * 1024 < ENDLESS_LIMIT


async def test_declared_length_over_cap_refused_without_reading(server: Server) -> None:
    async with open_fetcher(settings(fetch_timeout_s=3.0, fetch_retries=0)) as fetcher:
        started = time.monotonic()
        with pytest.raises(TooLargeError, match="declares 1000000000 bytes"):
            await fetcher.fetch_gallery(server.url("/biglen"))
    assert time.monotonic() - started < 1.0


async def test_body_shorter_than_content_length(server: Server) -> None:
    async with open_fetcher(settings(fetch_retries=0)) as fetcher:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch_gallery(server.url("/shortlen"))
    assert not isinstance(info.value, TooLargeError)
    assert "shortlen" in str(info.value)


# --- politeness --------------------------------------------------------------------------------------------


async def test_per_host_limit(server: Server) -> None:
    async with open_fetcher(settings(fetch_per_host=2)) as fetcher:
        bodies = await asyncio.gather(*(fetcher.fetch_gallery(server.url("/hold")) for _ in range(6)))
    assert bodies == [IMAGE] * 6
    assert server.max_active == 2


async def test_global_limit_across_hosts_and_kinds(server: Server) -> None:
    """One budget for everything: gallery and user downloads, whatever the host (connector limits are per
    session, so only the shared semaphore can hold this to 3)."""
    s = settings(fetch_concurrency=3, fetch_per_host=4, fetch_allow=["test-host.test"])
    hosts = ["gallery-a.test", "gallery-b.test"] * 3
    async with open_fetcher(s) as fetcher:
        gallery = [fetcher.fetch_gallery(server.url("/hold", host=h)) for h in hosts]
        user = [fetcher.fetch_user(server.url("/hold", host="test-host.test")) for _ in range(4)]
        bodies = await asyncio.gather(*gallery, *user)
    assert bodies == [IMAGE] * 10
    assert server.max_active == 3


async def test_waiting_for_a_slot_is_inside_the_time_limit(server: Server) -> None:
    """A download's clock starts when it is asked for: 8 x 0.15 s in series on one slot do not all fit in 0.5 s,
    and those that do not time out instead of waiting on (the ingest schedules per host so it never queues)."""
    s = settings(fetch_per_host=1, fetch_timeout_s=0.5, fetch_retries=0)
    async with open_fetcher(s) as fetcher:
        outcomes = await asyncio.gather(
            *(fetcher.fetch_gallery(server.url("/hold")) for _ in range(8)), return_exceptions=True
        )
    assert 1 <= outcomes.count(IMAGE) <= 4
    assert all(isinstance(o, FetchError) and "timed out" in str(o) for o in outcomes if o != IMAGE)
    assert server.max_active == 1


async def test_a_full_host_queue_refuses_users_at_once(server: Server) -> None:
    """Users' downloads of one host beyond its slots and its queue are refused (503), not queued."""
    s = settings(fetch_per_host=2, fetch_allow=["127.0.0.1"], fetch_timeout_s=5)
    async with open_fetcher(s, constants=Fetching(host_queue=3)) as fetcher:
        outcomes = await asyncio.gather(
            *(fetcher.fetch_user(server.url("/hold")) for _ in range(9)), return_exceptions=True
        )
    assert outcomes.count(IMAGE) == 5
    assert sum(isinstance(o, OverloadedError) for o in outcomes) == 4


async def test_not_started() -> None:
    fetcher = Fetcher(settings())
    with pytest.raises(RuntimeError, match="not started"):
        await fetcher.fetch_user("http://example.com/x.jpg")
    await fetcher.close()  # closing an unstarted fetcher is harmless


async def test_default_resolver_lifecycle(server: Server) -> None:
    """No resolver given: the real system resolver is created in start() and closed in close()."""
    fetcher = Fetcher(settings())
    await fetcher.start()
    try:
        assert await fetcher.fetch_gallery(server.url("/ok")) == IMAGE
        with pytest.raises(UnsafeURLError):
            await fetcher.fetch_user(server.url("/ok", host="localhost"))
    finally:
        await fetcher.close()
        await fetcher.close()


# --- user URLs: SSRF guard -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.0.0.1",
        "[::1]",
        "169.254.169.254",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "100.64.0.1",
        "0.0.0.0",
        "localhost",
    ],
)
async def test_user_refuses_forbidden_literals(host: str, server: Server) -> None:
    async with open_fetcher(settings()) as fetcher:
        with pytest.raises(UnsafeURLError):
            await fetcher.fetch_user(server.url("/ok", host=host))
    assert server.hits["/ok"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://test-host.test/x.jpg",
        "file:///etc/passwd",
        "http://user:pw@test-host.test:{port}/ok",
        "http://user@test-host.test:{port}/ok",
    ],
)
async def test_user_refuses_schemes_and_credentials(url: str, server: Server) -> None:
    async with open_fetcher(settings(fetch_allow=["test-host.test"])) as fetcher:
        with pytest.raises(UnsafeURLError):
            await fetcher.fetch_user(url.format(port=server.port))
    assert server.hits["/ok"] == 0


@pytest.mark.parametrize("name", ["evil.test", "mixed.test"])
async def test_user_refuses_name_resolving_to_loopback(name: str, server: Server) -> None:
    res = resolver()
    async with open_fetcher(settings(), resolver=res) as fetcher:
        with pytest.raises(UnsafeURLError, match="non-public address"):
            await fetcher.fetch_user(server.url("/ok", host=name))
        # The same name is fine for the trusted gallery path: the guard belongs to the user session only.
        assert await fetcher.fetch_gallery(server.url("/ok", host="evil.test")) == IMAGE
    assert res.lookups[name] >= 1
    assert server.hits["/ok"] == 1


@pytest.mark.parametrize("allow", [["127.0.0.1"], ["127.0.0.0/8"], ["test-host.test"], ["TEST-HOST.test"]])
async def test_user_allow_list_reaches_loopback(allow: list[str], server: Server) -> None:
    host = "test-host.test" if "host" in allow[0].lower() else "127.0.0.1"
    async with open_fetcher(settings(fetch_allow=allow)) as fetcher:
        assert await fetcher.fetch_user(server.url("/ok", host=host)) == IMAGE
    assert server.user_agents == ["PicTraceTest/9.9"]


async def test_user_allow_network_covers_resolved_names(server: Server) -> None:
    async with open_fetcher(settings(fetch_allow=["127.0.0.0/8"])) as fetcher:
        assert await fetcher.fetch_user(server.url("/ok", host="evil.test")) == IMAGE


async def test_user_is_not_retried(server: Server) -> None:
    async with open_fetcher(settings(fetch_allow=["127.0.0.1"], fetch_retries=3)) as fetcher:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch_user(server.url("/always500"))
    assert info.value.status == 503
    assert server.hits["/always500"] == 1


async def test_user_404_message(server: Server) -> None:
    url = server.url("/missing", host="test-host.test")
    async with open_fetcher(settings(fetch_allow=["test-host.test"])) as fetcher:
        with pytest.raises(FetchError, match="HTTP 404") as info:
            await fetcher.fetch_user(url)
    assert info.value.status == 404
    assert url in str(info.value)


# --- user URLs: redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/ok",
        "http://localhost:{port}/ok",
        "http://evil.test:{port}/ok",
        "http://[::1]:{port}/ok",
        "http://2130706433:{port}/ok",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "ftp://test-host.test/ok",
    ],
)
async def test_user_redirect_to_forbidden_target_refused(target: str, server: Server) -> None:
    to = target.format(port=server.port)
    url = server.url("/redirect", host="test-host.test").replace("/redirect", "/redirect?to=") + to
    async with open_fetcher(settings(fetch_allow=["test-host.test"])) as fetcher:
        with pytest.raises(UnsafeURLError):
            await fetcher.fetch_user(url)
    assert server.hits["/redirect"] == 1
    assert server.hits["/ok"] == 0


async def test_user_follows_allowed_redirects(server: Server) -> None:
    s = settings(fetch_allow=["test-host.test"])
    async with open_fetcher(s, constants=constants(max_redirects=3)) as fetcher:
        assert await fetcher.fetch_user(server.url("/chain/3", host="test-host.test")) == IMAGE
        relative = server.url("/redirect", host="test-host.test") + "?to=/ok"
        assert await fetcher.fetch_user(relative) == IMAGE
    assert server.hits["/chain/0"] == 1
    assert server.hits["/ok"] == 1


async def test_user_too_many_redirects(server: Server) -> None:
    s = settings(fetch_allow=["test-host.test"])
    async with open_fetcher(s, constants=constants(max_redirects=3)) as fetcher:
        with pytest.raises(FetchError, match="too many redirects"):
            await fetcher.fetch_user(server.url("/chain/4", host="test-host.test"))
    assert server.hits["/chain/0"] == 0
    assert server.hits["/chain/1"] == 1


async def test_user_zero_redirects_allowed(server: Server) -> None:
    s = settings(fetch_allow=["test-host.test"])
    async with open_fetcher(s, constants=constants(max_redirects=0)) as fetcher:
        with pytest.raises(FetchError, match="too many redirects"):
            await fetcher.fetch_user(server.url("/chain/1", host="test-host.test"))
        assert await fetcher.fetch_user(server.url("/chain/0", host="test-host.test")) == IMAGE


async def test_user_redirect_loop(server: Server) -> None:
    s = settings(fetch_allow=["test-host.test"])
    async with open_fetcher(s, constants=constants(max_redirects=10)) as fetcher:
        with pytest.raises(FetchError, match="redirect loop"):
            await fetcher.fetch_user(server.url("/loop/a", host="test-host.test"))
    assert server.hits["/loop/a"] == 1
    assert server.hits["/loop/b"] == 1


async def test_user_allow_entry_with_a_port_opens_that_port_only(server: Server) -> None:
    """``127.0.0.1:PORT`` reaches the test server there; any other port of the same host stays closed."""
    async with open_fetcher(settings(fetch_allow=[f"127.0.0.1:{server.port}", f"test-host.test:{server.port}"])) as f:
        assert await f.fetch_user(server.url("/ok")) == IMAGE
        assert await f.fetch_user(server.url("/ok", host="test-host.test")) == IMAGE
        with pytest.raises(UnsafeURLError, match="non-public"):
            await f.fetch_user(f"http://127.0.0.1:{server.port + 1}/ok")
        with pytest.raises(UnsafeURLError, match="non-public"):
            await f.fetch_user(f"http://test-host.test:{server.port + 1}/ok")
