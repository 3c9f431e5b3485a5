"""Address policy for URLs that strangers give us (SSRF guard).

A user's URL must never make PicTrace talk to its own machine, the operator's private network or a cloud
metadata endpoint. Two checks cover that:

* :func:`check_url` refuses bad schemes, credentials and forbidden IP *literals* up front (aiohttp's connector
  never asks the resolver about a literal, so nothing else would see them);
* :class:`GuardedResolver` checks every address a *name* resolves to. The connector only connects to addresses
  the resolver returned, so a DNS answer that changes between a check and the connect (DNS rebinding) cannot
  slip through.

``fetch_allow`` entries (hostnames, IPs or CIDR networks, or a host or IP on one port: ``host:port``) let an
operator open holes deliberately.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from pictrace.errors import UnsafeURLError

__all__ = [
    "AllowList",
    "ForbiddenAddressError",
    "GuardedResolver",
    "check_host_characters",
    "check_url",
    "is_forbidden_address",
    "parse_allow",
    "parse_ip_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})

# IPv6 ranges whose last 32 bits are an IPv4 address the packet really ends up at.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


class ForbiddenAddressError(UnsafeURLError, OSError):
    """Raised by :class:`GuardedResolver`.

    It is an ``OSError`` so aiohttp treats it like any DNS failure (and wraps it in
    ``ClientConnectorDNSError``), and an :class:`UnsafeURLError` so callers can recognise and re-raise it.
    """


@dataclass(frozen=True)
class AllowList:
    """Parsed ``fetch_allow``: hostnames (lower case, no trailing dot) and IP networks, each on every port, and
    hosts or addresses on one port only (``host:port``, ``1.2.3.4:port``, ``[v6]:port``)."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]
    host_ports: frozenset[tuple[str, int]] = frozenset()
    address_ports: frozenset[tuple[IPAddress, int]] = frozenset()

    def allows_host(self, host: str, port: int | None = None) -> bool:
        name = _normalise_host(host)
        return name in self.hosts or (port is not None and (name, port) in self.host_ports)

    def allows_address(self, ip: IPAddress, port: int | None = None) -> bool:
        ip = _strip_scope(ip)
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        return port is not None and (ip, port) in self.address_ports


_WITH_PORT = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<port6>\d{1,5})|(?P<host>[^:\[\]/]+):(?P<port>\d{1,5})")


def _entry_port(entry: str) -> tuple[str, int] | None:
    """(host or address, port) of a ``host:port`` or ``[v6]:port`` entry, None for an entry on every port."""
    match = _WITH_PORT.fullmatch(entry)
    if match is None:
        return None
    host = match["v6"] if match["v6"] is not None else match["host"]
    port = int(match["port6"] if match["port6"] is not None else match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"fetch_allow entry {entry!r} names port {port}, outside 1-65535")
    return host, port


@functools.lru_cache(maxsize=64)
def _parse_allow_cached(entries: tuple[str, ...]) -> AllowList:
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    host_ports: set[tuple[str, int]] = set()
    address_ports: set[tuple[IPAddress, int]] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        with_port = _entry_port(entry)
        if with_port is not None:
            host, port = with_port
            try:
                address_ports.add((_strip_scope(ipaddress.ip_address(host)), port))
            except ValueError:
                host_ports.add((_normalise_host(host), port))
            continue
        candidate = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
        try:
            networks.append(ipaddress.ip_network(candidate, strict=False))
            continue
        except ValueError:
            if "/" in candidate or ":" in candidate:
                raise ValueError(
                    f"fetch_allow entry {raw!r} is not a hostname, host:port, address or CIDR network "
                    "(a network opens every port of its hosts)"
                ) from None
        hosts.add(_normalise_host(entry))
    return AllowList(frozenset(hosts), tuple(networks), frozenset(host_ports), frozenset(address_ports))


def parse_allow(allow: Sequence[str] | AllowList) -> AllowList:
    """Turn ``fetch_allow`` into an :class:`AllowList` (cached: settings rarely change)."""
    if isinstance(allow, AllowList):
        return allow
    return _parse_allow_cached(tuple(allow))


def check_host_characters(host: str) -> None:
    """Refuse a host with whitespace or control characters (a trailing space, NBSP, U+3000...): URL parsers
    keep them, and a system resolver would be asked about a name no DNS server could hold."""
    for ch in host:
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            raise UnsafeURLError(f"host {host!r} contains whitespace or a control character (U+{ord(ch):04X})")


def _normalise_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _strip_scope(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches (mapped, compatible, NAT64, 6to4), if any."""
    if ip in _MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _COMPAT and int(ip) > 1:  # not :: or ::1, which are checked as themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def is_forbidden_address(ip: str | IPAddress) -> bool:
    """True for anything that is not a plain public unicast address.

    ``ipaddress``'s ``is_global`` is the base; multicast, reserved and site-local are added because Python
    counts some of them as global. Addresses that embed IPv4 are judged by the IPv4 address they reach.
    Unparseable input is forbidden (fail closed).
    """
    if isinstance(ip, str):
        try:
            addr: IPAddress = ipaddress.ip_address(ip.strip("[]"))
        except ValueError:
            return True
    else:
        addr = ip
    addr = _strip_scope(addr)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr in _NAT64_LOCAL or addr.teredo is not None:
            return True
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return is_forbidden_address(embedded)
        if addr.is_site_local:
            return True
    elif addr in _CGNAT:
        return True
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def _parse_ipv4_number(part: str) -> int | None:
    """One part of a legacy IPv4 literal (decimal, ``0x`` hex or leading-zero octal), None if not numeric."""
    if not part or not part.isascii():
        return None
    base = 10
    digits = part
    if part[:2].lower() == "0x":
        base, digits = 16, part[2:]
        if not digits:
            return 0
    elif len(part) > 1 and part[0] == "0":
        base, digits = 8, part[1:]
    try:
        return int(digits, base)
    except ValueError:
        return None


def _ends_in_number(host: str) -> bool:
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    if last.isascii() and last.isdigit():
        return True
    return last[:2].lower() == "0x" and all(c in "0123456789abcdefABCDEF" for c in last[2:])


def _parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address:
    """Parse every IPv4 spelling a browser or ``inet_aton`` accepts (WHATWG URL standard rules).

    ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``0x7f.0.0.1`` and ``127.1`` all mean 127.0.0.1.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if len(parts) > 4:
        raise UnsafeURLError(f"host {host!r} looks like an IPv4 address but has too many parts")
    numbers: list[int] = []
    for part in parts:
        number = _parse_ipv4_number(part)
        if number is None:
            raise UnsafeURLError(f"host {host!r} looks like an IPv4 address but is not a valid one")
        numbers.append(number)
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise UnsafeURLError(f"host {host!r} looks like an IPv4 address but is out of range")
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - index)
    return ipaddress.IPv4Address(value)


def parse_ip_host(host: str) -> IPAddress | None:
    """The IP address a URL host denotes, or None when it is a name that needs DNS.

    Raises UnsafeURLError for hosts that look numeric but are malformed: what a resolver would make of them
    is unpredictable, so they are refused rather than guessed at.
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise UnsafeURLError(f"host {host!r} is not a valid IPv6 address") from None
    if _ends_in_number(host):
        return _parse_legacy_ipv4(host)
    return None


def _check_address(ip: IPAddress, allow: AllowList, what: str, port: int | None) -> None:
    if allow.allows_address(ip, port):
        return
    if is_forbidden_address(ip):
        raise UnsafeURLError(f"{what} is a non-public address ({ip}); refusing to fetch it")


def check_url(url: str | yarl.URL, allow: Sequence[str] | AllowList = ()) -> yarl.URL:
    """Validate a stranger's URL before anything is fetched; returns the parsed URL.

    Names are *not* resolved here (that happens in :class:`GuardedResolver`, at connect time); IP literals in
    any spelling are checked right away.
    """
    allow_list = parse_allow(allow)
    try:
        parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise UnsafeURLError(f"not a valid URL: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme!r}" if scheme else "none"
        raise UnsafeURLError(f"only http and https URLs can be fetched (scheme: {shown})")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise UnsafeURLError("URLs with a user name or password are not accepted")
    host = parsed.host
    if not host:
        raise UnsafeURLError("the URL has no host")
    check_host_characters(host)
    try:
        port = parsed.port  # yarl validates the port lazily; the scheme's default when none is given
    except ValueError as exc:
        raise UnsafeURLError(f"invalid port: {exc}") from None
    if allow_list.allows_host(host, port):
        return parsed
    ip = parse_ip_host(host)
    if ip is not None:
        _check_address(ip, allow_list, f"host {host!r}", port)
        return parsed
    if "%" in host or "/" in host or "\\" in host:
        raise UnsafeURLError(f"host {host!r} contains characters a host name cannot have")
    name = _normalise_host(host)
    if name == "localhost" or name.endswith(".localhost"):
        raise UnsafeURLError(f"host {host!r} is this machine; refusing to fetch it")
    return parsed


class GuardedResolver(AbstractResolver):
    """Resolver that refuses names resolving to any forbidden address.

    Wraps a real resolver (``ThreadedResolver`` by default, which needs a running event loop at construction).
    One bad address among several fails the whole lookup: the connector may try any of them.
    """

    def __init__(self, base: AbstractResolver | None = None, allow: Sequence[str] | AllowList = ()) -> None:
        self._owns_base = base is None
        self._base: AbstractResolver = base if base is not None else ThreadedResolver()
        self._allow = parse_allow(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        check_host_characters(host)
        results = await self._base.resolve(host, port, family)
        if self._allow.allows_host(host, port):
            return results
        for result in results:
            try:
                ip: IPAddress = ipaddress.ip_address(result["host"])
            except ValueError:
                raise ForbiddenAddressError(
                    f"host {host!r} resolved to an unparseable address {result['host']!r}"
                ) from None
            if not self._allow.allows_address(ip, port) and is_forbidden_address(ip):
                raise ForbiddenAddressError(
                    f"host {host!r} resolves to a non-public address ({ip}); refusing to fetch it"
                )
        return results

    async def close(self) -> None:
        if self._owns_base:
            await self._base.close()
