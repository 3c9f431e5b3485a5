"""The SSRF address policy: URL checks, address classes, allow-list and the guarded resolver."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import yarl
from resolvers import MapResolver

from pictrace.errors import UnsafeURLError
from pictrace.ssrf import GuardedResolver, check_url, is_forbidden_address, parse_allow, parse_ip_host

# --- check_url -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.jpg",
        "http://images.example.org:8080/a/b.png?x=1",
        "http://8.8.8.8/x.jpg",
        "http://[2606:4700:4700::1111]/x.jpg",
        "HTTPS://Example.COM/",
    ],
)
def test_check_url_accepts_public_urls(url: str) -> None:
    parsed = check_url(url, [])
    assert isinstance(parsed, yarl.URL)
    assert parsed.scheme.lower() in {"http", "https"}


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/a.jpg", "http and https"),
        ("file:///etc/passwd", "http and https"),
        ("gopher://example.com/", "http and https"),
        ("javascript:alert(1)", "http and https"),
        ("example.com/a.jpg", "http and https"),
        ("http://user:secret@example.com/a.jpg", "password"),
        ("http://user@example.com/a.jpg", "password"),
        ("http:///a.jpg", "no host"),
        ("http://127.0.0.1/", "non-public"),
        ("http://127.0.0.1./", "non-public"),
        ("http://10.0.0.1/", "non-public"),
        ("http://172.16.5.4/", "non-public"),
        ("http://192.168.1.1/", "non-public"),
        ("http://169.254.169.254/latest/meta-data/", "non-public"),
        ("http://100.64.0.1/", "non-public"),
        ("http://0.0.0.0/", "non-public"),
        ("http://255.255.255.255/", "non-public"),
        ("http://224.0.0.1/", "non-public"),
        ("http://2130706433/", "non-public"),
        ("http://0x7f000001/", "non-public"),
        ("http://0177.0.0.1/", "non-public"),
        ("http://0x7f.0.0.1/", "non-public"),
        ("http://127.1/", "non-public"),
        ("http://0/", "non-public"),
        ("http://[::1]/", "non-public"),
        ("http://[::]/", "non-public"),
        ("http://[::ffff:127.0.0.1]/", "non-public"),
        ("http://[::ffff:169.254.169.254]/", "non-public"),
        ("http://[fe80::1]/", "non-public"),
        ("http://[fd00::1]/", "non-public"),
        ("http://[64:ff9b::a00:1]/", "non-public"),
        ("http://[2002:7f00:1::]/", "non-public"),
        ("http://1.2.3.4.5/", "too many parts"),
        ("http://256.0.0.1/", "out of range"),
        ("http://0x1g.0.0.1/", "looks like an IPv4"),
        ("http://localhost/", "this machine"),
        ("http://foo.localhost./", "this machine"),
        ("http://%31%32%37.0.0.1/", "IPv4"),
    ],
)
def test_check_url_refuses(url: str, fragment: str) -> None:
    with pytest.raises(UnsafeURLError, match=fragment):
        check_url(url, [])


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.1.65535", "10.1.255.255"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("8.8.8.8", "8.8.8.8"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
    ],
)
def test_parse_ip_host_understands_legacy_spellings(host: str, expected: str) -> None:
    assert parse_ip_host(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host", ["example.com", "0x7f.example.com", "1.2.3.example", "xn--bcher-kva.example"]
)
def test_parse_ip_host_leaves_names_alone(host: str) -> None:
    assert parse_ip_host(host) is None


# --- is_forbidden_address ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "255.255.255.255",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "198.18.0.1",
        "::",
        "::1",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::1",
        "2002:7f00:1::1",
        "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "not an address",
        "",
    ],
)
def test_forbidden_addresses(address: str) -> None:
    assert is_forbidden_address(address) is True


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.63.255.255",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses(address: str) -> None:
    assert is_forbidden_address(address) is False
    assert is_forbidden_address(ipaddress.ip_address(address)) is False


# --- allow-list ----------------------------------------------------------------------------------------


def test_allow_list_ip_and_network() -> None:
    assert check_url("http://127.0.0.1:8080/x", ["127.0.0.1"]).port == 8080
    assert check_url("http://127.9.9.9/x", ["127.0.0.0/8"]).host == "127.9.9.9"
    assert check_url("http://2130706433/x", ["127.0.0.0/8"]).host == "2130706433"
    assert check_url("http://[::1]/x", ["::1"]).host == "::1"
    assert check_url("http://10.2.3.4/x", ["10.2.3.0/24"]).host == "10.2.3.4"
    with pytest.raises(UnsafeURLError):
        check_url("http://127.0.0.1/x", ["10.0.0.0/8"])
    with pytest.raises(UnsafeURLError):
        check_url("http://10.2.4.1/x", ["10.2.3.0/24"])


def test_allow_list_hostnames_are_exact_and_case_insensitive() -> None:
    assert check_url("http://Intranet.Example./img.png", ["intranet.example"]).host == "intranet.example."
    assert check_url("http://localhost/x", ["LOCALHOST"]).host == "localhost"
    with pytest.raises(UnsafeURLError):
        check_url("http://localhost/x", ["intranet.example"])
    allow = parse_allow(["intranet.example", "10.0.0.0/8"])
    assert allow.allows_host("INTRANET.example")
    assert not allow.allows_host("sub.intranet.example")
    assert allow.allows_address(ipaddress.ip_address("10.9.9.9"))
    assert not allow.allows_address(ipaddress.ip_address("11.0.0.1"))


def test_allow_list_rejects_malformed_network() -> None:
    with pytest.raises(ValueError, match="CIDR"):
        parse_allow(["10.0.0.0/99"])


def test_allow_list_does_not_bypass_scheme_or_credentials() -> None:
    with pytest.raises(UnsafeURLError):
        check_url("ftp://127.0.0.1/", ["127.0.0.1"])
    with pytest.raises(UnsafeURLError):
        check_url("http://a:b@127.0.0.1/", ["127.0.0.1"])


# --- GuardedResolver -----------------------------------------------------------------------------------


TABLE = {
    "good.test": ["93.184.216.34"],
    "evil.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["93.184.216.34", "10.0.0.7"],
    "v6evil.test": ["::1"],
    "mapped.test": ["::ffff:192.168.0.1"],
    "intranet.test": ["10.1.2.3"],
}


async def test_guarded_resolver_passes_public_addresses() -> None:
    resolver = GuardedResolver(MapResolver(TABLE))
    results = await resolver.resolve("good.test", 443)
    assert [r["host"] for r in results] == ["93.184.216.34"]
    assert results[0]["port"] == 443


@pytest.mark.parametrize("host", ["evil.test", "metadata.test", "mixed.test", "v6evil.test", "mapped.test"])
async def test_guarded_resolver_refuses_forbidden_addresses(host: str) -> None:
    resolver = GuardedResolver(MapResolver(TABLE))
    with pytest.raises(UnsafeURLError, match="non-public") as info:
        await resolver.resolve(host, 80)
    # aiohttp only wraps OSError from a resolver; being one keeps its error path intact.
    assert isinstance(info.value, OSError)
    assert host in str(info.value)


async def test_guarded_resolver_allow_list() -> None:
    by_name = GuardedResolver(MapResolver(TABLE), ["intranet.test"])
    assert [r["host"] for r in await by_name.resolve("intranet.test", 80)] == ["10.1.2.3"]
    with pytest.raises(UnsafeURLError):
        await by_name.resolve("evil.test", 80)
    by_network = GuardedResolver(MapResolver(TABLE), ["10.0.0.0/8"])
    assert [r["host"] for r in await by_network.resolve("intranet.test", 80)] == ["10.1.2.3"]
    with pytest.raises(UnsafeURLError):
        await by_network.resolve("evil.test", 80)


async def test_guarded_resolver_passes_through_lookup_failures() -> None:
    resolver = GuardedResolver(MapResolver(TABLE))
    with pytest.raises(socket.gaierror):
        await resolver.resolve("missing.test", 80)


async def test_guarded_resolver_leaves_a_borrowed_base_open() -> None:
    base = MapResolver(TABLE)
    await GuardedResolver(base).close()
    assert base.closed is False


async def test_guarded_resolver_default_base_refuses_localhost() -> None:
    """The real system resolver: 'localhost' resolves without a network and must be refused."""
    resolver = GuardedResolver()
    try:
        with pytest.raises(UnsafeURLError):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


# --- host names no resolver should see, and allow entries on one port ------------------------------------------


@pytest.mark.parametrize("suffix", [" ", "\u00a0", "\u3000", "\x01", "\x7f", "\u2028"])
async def test_hosts_with_whitespace_or_control_characters_are_refused_before_any_lookup(suffix: str) -> None:
    base = MapResolver({"example.com": ["93.184.216.34"]})
    guarded = GuardedResolver(base, [])
    url = f"http://example.com{suffix}/a.jpg"
    with pytest.raises(UnsafeURLError, match=r"whitespace or a control character|not a valid URL"):
        check_url(url, [])
    with pytest.raises(UnsafeURLError, match="whitespace or a control character"):
        await guarded.resolve(f"example.com{suffix}", 80)
    assert base.lookups == {}


@pytest.mark.parametrize(
    ("allow", "allowed", "refused"),
    [
        (["127.0.0.1:8080"], ["http://127.0.0.1:8080/a"], ["http://127.0.0.1:8081/a", "http://127.0.0.1/a"]),
        (["[::1]:8080"], ["http://[::1]:8080/a"], ["http://[::1]:22/a", "http://[::1]/a"]),
        (["intranet.test:443"], ["https://intranet.test/a", "http://intranet.test:443/a"], []),
        (["10.0.0.0/8"], ["http://10.1.2.3:22/a", "http://10.1.2.3/a"], []),
    ],
)
def test_allow_entries_may_name_one_port(allow: list[str], allowed: list[str], refused: list[str]) -> None:
    for url in allowed:
        check_url(url, allow)
    for url in refused:
        with pytest.raises(UnsafeURLError, match="non-public"):
            check_url(url, allow)
    parsed = parse_allow(allow)
    if allow == ["intranet.test:443"]:
        assert parsed.allows_host("intranet.test", 443) and not parsed.allows_host("intranet.test", 80)


@pytest.mark.parametrize("entry", ["10.0.0.0/8:80", "host:port", "[::1]:99999"])
def test_allow_entries_that_mean_nothing_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="fetch_allow entry"):
        parse_allow([entry])


async def test_a_name_allowed_on_one_port_resolves_to_loopback_on_that_port_only() -> None:
    guarded = GuardedResolver(MapResolver({"intranet.test": ["10.0.0.5"]}), ["intranet.test:8443"])
    assert [r["host"] for r in await guarded.resolve("intranet.test", 8443)] == ["10.0.0.5"]
    with pytest.raises(UnsafeURLError, match="non-public"):
        await guarded.resolve("intranet.test", 22)
