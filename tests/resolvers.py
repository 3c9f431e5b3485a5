"""A real aiohttp resolver over a fixed table, so tests decide what a name resolves to (SSRF tests)."""

from __future__ import annotations

import socket
from collections import Counter

from aiohttp.abc import AbstractResolver, ResolveResult


class MapResolver(AbstractResolver):
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: Counter[str] = Counter()
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups[host] += 1
        addresses = self.table.get(host.rstrip(".").lower())
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        self.closed = True
