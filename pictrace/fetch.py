"""Safe, polite async downloads.

Two kinds of URL reach PicTrace and they deserve different trust:

* the operator's gallery (``db.json`` and the images it lists) may live on a private network, so it skips the
  SSRF guard, and a flaky gallery server is worth a few retries;
* a stranger's query URL goes through :func:`pictrace.ssrf.check_url`, a :class:`GuardedResolver` and a
  re-check of every redirect hop, and is tried once.

Each kind gets its own ``ClientSession`` so the guarded resolver can never be bypassed by a shared connection
pool. Both share the limits that keep us polite (total and per-host concurrency) and safe (time and bytes). A
download's time limit counts from when it is asked for, every wait for a slot included; it takes its host's slot
before one of the shared pool, so one slow host can hold only its own share; users' downloads queue behind a host
only so far (then 503), and the gallery holds at most its share of the pool, so URL searches always find a slot.
Failures always raise (``FetchError``, ``TooLargeError``, ``UnsafeURLError``); nothing returns ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver

from pictrace.config import Settings
from pictrace.errors import FetchError, OverloadedError, TooLargeError, UnsafeURLError
from pictrace.ssrf import ALLOWED_SCHEMES, GuardedResolver, check_host_characters, check_url, parse_allow
from pictrace.tuning import Fetching

__all__ = ["Fetcher", "HTTPStatusError"]

log = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUSES = frozenset({408, 425, 429})
CHUNK_BYTES = 64 * 1024


class HTTPStatusError(FetchError):
    """A non-2xx answer; keeps ``Retry-After`` so the gallery retry loop can honour it."""

    def __init__(self, message: str, *, status: int, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status, retryable=status >= 500 or status in RETRYABLE_STATUSES)
        self.retry_after_s = retry_after_s


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` is either delta-seconds or an HTTP date; anything unparsable is ignored."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _host_key(url: yarl.URL) -> str:
    return (url.host or "").rstrip(".").lower()


def host_of(url: str) -> str:
    """The politeness key of a URL: its host, as the per-host limit counts it (the ingest schedules by it)."""
    try:
        return _host_key(yarl.URL(url))
    except ValueError:
        return ""


class _HostLimiter:
    """Per-host slots with a bounded queue of waiters, dropped when idle so a stream of distinct hosts cannot
    grow the dict forever."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    def waiting(self, host: str) -> int:
        """Downloads of ``host`` that hold no slot yet."""
        sem, users = self._slots.get(host, (None, 0))
        return max(0, users - self._limit) if sem is not None else 0

    @contextlib.asynccontextmanager
    async def hold(self, host: str, *, max_waiting: int | None = None) -> AsyncIterator[None]:
        """A slot of ``host``; with ``max_waiting``, OverloadedError instead of waiting behind that many."""
        sem, users = self._slots.get(host, (None, 0))
        if sem is None:
            sem = asyncio.Semaphore(self._limit)
        if max_waiting is not None and sem.locked() and self.waiting(host) >= max_waiting:
            raise OverloadedError(f"too many downloads from {host} are waiting; retry later", retry_after_s=5)
        self._slots[host] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._slots[host]
            if users <= 1:
                del self._slots[host]
            else:
                self._slots[host] = (sem, users - 1)


class Fetcher:
    """Downloads gallery and user images within the configured limits.

    Use as ``async with Fetcher(settings) as fetcher:`` (or call :meth:`start` / :meth:`close`). ``resolver``
    is the base DNS resolver for both sessions (default ``aiohttp.ThreadedResolver``); the user session always
    wraps it in a :class:`GuardedResolver`. ``backoff_base_s`` and ``retry_after_cap_s`` tune the gallery
    retry loop (small values keep tests fast).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        constants: Fetching | None = None,
        resolver: AbstractResolver | None = None,
        backoff_base_s: float = 0.5,
        retry_after_cap_s: float = 10.0,
    ) -> None:
        self._settings = settings
        self._constants = constants or Fetching()
        self._base_resolver = resolver
        self._owns_resolver = False
        self._allow = parse_allow(settings.fetch_allow)
        self._backoff_base_s = backoff_base_s
        self._retry_after_cap_s = retry_after_cap_s
        self._global = asyncio.Semaphore(settings.fetch_concurrency)
        gallery_slots = max(1, int(settings.fetch_concurrency * self._constants.gallery_share))
        self._gallery_slots = asyncio.Semaphore(gallery_slots)
        self._hosts = _HostLimiter(settings.fetch_per_host)
        self._gallery: aiohttp.ClientSession | None = None
        self._user: aiohttp.ClientSession | None = None
        self._guarded: GuardedResolver | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create both sessions (needs a running loop, hence not in ``__init__``)."""
        if self._gallery is not None:
            return
        if self._base_resolver is None:
            self._base_resolver = aiohttp.ThreadedResolver()
            self._owns_resolver = True
        s = self._settings
        timeout = aiohttp.ClientTimeout(
            total=None, connect=s.fetch_connect_timeout_s, sock_connect=s.fetch_connect_timeout_s
        )
        # Images are already compressed; asking for identity keeps Content-Length comparable with the body.
        headers = {"User-Agent": self._constants.user_agent, "Accept-Encoding": "identity"}
        self._guarded = GuardedResolver(self._base_resolver, self._allow)
        self._gallery = self._make_session(self._base_resolver, timeout, headers)
        self._user = self._make_session(self._guarded, timeout, headers)

    def _make_session(
        self, resolver: AbstractResolver, timeout: aiohttp.ClientTimeout, headers: dict[str, str]
    ) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=resolver, limit=self._settings.fetch_concurrency, limit_per_host=self._settings.fetch_per_host
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers=headers,
            trust_env=False,  # a proxy would connect for us and bypass the guarded resolver
            cookie_jar=aiohttp.DummyCookieJar(),  # strangers' cookies must not leak into other fetches
        )

    async def close(self) -> None:
        for session in (self._gallery, self._user):
            if session is not None:
                await session.close()
        self._gallery = self._user = None
        if self._guarded is not None:
            await self._guarded.close()
            self._guarded = None
        if self._owns_resolver and self._base_resolver is not None:
            await self._base_resolver.close()
            self._base_resolver = None
            self._owns_resolver = False

    async def __aenter__(self) -> Fetcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _session(self, session: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
        if session is None:
            raise RuntimeError("Fetcher is not started; use 'async with Fetcher(...)' or await start()")
        return session

    # --- public API ----------------------------------------------------------------------------------

    async def fetch_gallery(self, url: str) -> bytes:
        """Download from the operator's trusted gallery, retrying transient failures with backoff."""
        session = self._session(self._gallery)
        parsed = self._check_scheme(url)
        attempts = self._settings.fetch_retries + 1
        for attempt in range(attempts):
            try:
                return await self._follow(session, parsed, self._check_scheme, user=False)
            except FetchError as exc:
                if not exc.retryable:
                    raise
                if attempt + 1 >= attempts:
                    if attempts == 1:
                        raise
                    raise FetchError(
                        f"{exc} (gave up after {attempts} attempts)", status=exc.status, retryable=True
                    ) from exc
                delay = self._backoff(attempt, exc)
                log.info("retrying %s in %.2fs after: %s", parsed, delay, exc)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch_user(self, url: str) -> bytes:
        """Download a stranger's URL once, refusing non-public addresses at every hop."""
        session = self._session(self._user)
        return await self._follow(session, check_url(url, self._allow), self._check_user_url, user=True)

    # --- internals -----------------------------------------------------------------------------------

    def _check_user_url(self, url: str | yarl.URL) -> yarl.URL:
        return check_url(url, self._allow)

    async def _follow(
        self, session: aiohttp.ClientSession, start: yarl.URL, vet: Callable[[yarl.URL], yarl.URL], *, user: bool
    ) -> bytes:
        """GET with redirects followed by hand, so ``vet`` sees every hop before it is requested.

        aiohttp's own redirect handling would connect first and ask later (and its ``max_redirects=0``
        means unlimited), so it is never used. One clock for the whole download, waits for slots included.
        """
        current = start
        seen = {str(current.with_fragment(None))}
        max_redirects = self._constants.max_redirects
        deadline = asyncio.get_running_loop().time() + self._settings.fetch_timeout_s
        for hop in range(max_redirects + 1):
            outcome = await self._exchange(session, current, deadline=deadline, user=user)
            if isinstance(outcome, bytes):
                return outcome
            if hop >= max_redirects:
                break
            target = vet(outcome)
            key = str(target.with_fragment(None))
            if key in seen:
                raise FetchError(f"redirect loop: {current} redirects back to {target}")
            seen.add(key)
            current = target
        raise FetchError(f"too many redirects (more than {max_redirects}) starting from {start}")

    @contextlib.asynccontextmanager
    async def _slots(self, url: yarl.URL, *, user: bool) -> AsyncIterator[None]:
        """The host's slot first, then one of the shared pool: a download waiting for a slow host holds nothing
        another host's downloads need, so a host can take at most ``fetch_per_host`` of the pool. A user's
        download is refused (503) rather than queued behind ``host_queue`` others; the gallery's waits its turn,
        within its share of the pool."""
        host = _host_key(url)
        async with self._hosts.hold(host, max_waiting=self._constants.host_queue if user else None):
            if user:
                async with self._global:
                    yield
            else:
                async with self._gallery_slots, self._global:
                    yield

    @staticmethod
    def _check_scheme(url: str | yarl.URL) -> yarl.URL:
        try:
            parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
        except (ValueError, TypeError) as exc:
            raise UnsafeURLError(f"not a valid URL: {exc}") from None
        if parsed.scheme.lower() not in ALLOWED_SCHEMES:
            raise UnsafeURLError(f"only http and https URLs can be fetched (scheme: {parsed.scheme!r})")
        if not parsed.host:
            raise UnsafeURLError("the URL has no host")
        check_host_characters(parsed.host)
        return parsed

    def _backoff(self, attempt: int, exc: FetchError) -> float:
        """Exponential backoff with jitter (so many clients do not retry in lockstep), or Retry-After."""
        base = self._backoff_base_s * (2.0**attempt)
        delay = base / 2 + random.uniform(0, base / 2)
        if isinstance(exc, HTTPStatusError) and exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, self._retry_after_cap_s))
        return delay

    async def _exchange(
        self, session: aiohttp.ClientSession, url: yarl.URL, *, deadline: float, user: bool
    ) -> bytes | yarl.URL:
        """One request within the download's deadline, the wait for its slots included."""
        try:
            async with asyncio.timeout_at(deadline), self._slots(url, user=user):
                return await self._request(session, url)
        except aiohttp.ConnectionTimeoutError as exc:
            raise FetchError(
                f"timed out connecting to {url.host} after {self._settings.fetch_connect_timeout_s:g}s",
                retryable=True,
            ) from exc
        except TimeoutError as exc:
            raise FetchError(
                f"timed out after {self._settings.fetch_timeout_s:g}s fetching {url}", retryable=True
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, UnsafeURLError):
                raise UnsafeURLError(str(exc.os_error)) from exc
            if isinstance(exc, aiohttp.ClientConnectorDNSError):
                raise FetchError(f"cannot resolve host {url.host}", retryable=True) from exc
            reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
            raise FetchError(
                f"cannot connect to {url.host}:{url.port}: {reason}", retryable=True
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise UnsafeURLError(f"URL refused by the HTTP client: {exc}") from exc
        except aiohttp.ClientPayloadError as exc:
            raise FetchError(f"incomplete response body from {url}: {exc}", retryable=True) from exc
        except aiohttp.ClientConnectionError as exc:
            reason = str(exc) or type(exc).__name__
            raise FetchError(f"connection to {url.host} failed: {reason}", retryable=True) from exc
        except aiohttp.ClientError as exc:
            reason = str(exc) or type(exc).__name__
            raise FetchError(f"fetching {url} failed: {reason}") from exc

    async def _request(self, session: aiohttp.ClientSession, url: yarl.URL) -> bytes | yarl.URL:
        """GET ``url``: the body, or the redirect target for the caller to vet."""
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status in REDIRECT_STATUSES:
                location = resp.headers.get(aiohttp.hdrs.LOCATION)
                if not location:
                    raise FetchError(
                        f"HTTP {resp.status} redirect without a Location from {url}", status=resp.status
                    )
                try:
                    return resp.url.join(yarl.URL(location))
                except ValueError as exc:
                    raise FetchError(f"invalid redirect Location {location!r} from {url}") from exc
            if not 200 <= resp.status < 300:
                raise HTTPStatusError(
                    f"HTTP {resp.status} from {resp.url}",  # not the server's reason text: it is untrusted
                    status=resp.status,
                    retry_after_s=_parse_retry_after(resp.headers.get(aiohttp.hdrs.RETRY_AFTER)),
                )
            try:
                return await self._read_capped(resp)
            except BaseException:
                resp.close()  # drop the connection now; do not drain a hostile body
                raise

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read the body, stopping the moment it exceeds ``max_download_bytes``."""
        limit = self._settings.max_download_bytes
        declared = resp.content_length
        if declared is not None and declared > limit:
            raise TooLargeError(f"{resp.url} declares {declared} bytes, more than the {limit}-byte limit")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise TooLargeError(f"{resp.url} sent more than the {limit}-byte limit")
        encoding = resp.headers.get(aiohttp.hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if declared is not None and encoding in ("", "identity") and len(body) != declared:
            raise FetchError(f"{resp.url} declared {declared} bytes but sent {len(body)}", retryable=True)
        return bytes(body)
