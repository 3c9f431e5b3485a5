"""A throw-away Milvus standalone server for the tests: PyPI's ``milvus`` package (Milvus 2.3.5), a temp data dir,
127.0.0.1, a free proxy port.

The package unpacks a ``milvus`` binary with an embedded etcd and local storage; we start that binary ourselves
(not ``MilvusServer.start``) so that it dies with the test process (``PR_SET_PDEATHSIG``) and a crash is reported
at once instead of after its 180 s wait. Its embedded etcd listens on fixed ports (2379, 2380), so one server
runs per machine: it is session-scoped, and the tests that use it drop every collection first. Stopped and
started again on the same data dir and port, it keeps its collections (the restart tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MISSING = "the Milvus test server is not installed: pip install -r requirements-test.txt (the `milvus` package)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class MilvusTestServer:
    def __init__(self, root: Path, port: int) -> None:
        from milvus import MilvusServerConfig, _initialize_data_files

        self.root = root
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        config = MilvusServerConfig(data_dir=str(root), proxy_port=port)
        config.resolve()  # writes configs/milvus.yaml with free ports for everything that can move
        _initialize_data_files(str(root))  # unpacks bin/milvus and its libraries
        self._health_port = _free_port()
        self._health = f"http://127.0.0.1:{self._health_port}/healthz"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        binary = self.root / "bin" / "milvus"
        env = dict(os.environ, DEPLOY_MODE="STANDALONE", METRICS_PORT=str(self._health_port),
                   MILVUS_RUN_DIR=str(self.root / "run"),
                   LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        log = (self.root / "logs" / "server.log").open("ab")
        self.process = subprocess.Popen([str(binary), "run", "standalone"], cwd=self.root, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus exited ({self.process.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self._health, timeout=2) as resp:
                if b"OK" in resp.read():
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"milvus did not become healthy in {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        """Kill it (a graceful stop takes ~10 s; what was flushed or logged survives either way)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def log_tail(self, lines: int = 15) -> str:
        path = self.root / "logs" / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def client(self) -> Any:
        from pymilvus import MilvusClient

        return MilvusClient(uri=self.uri, timeout=30)

    def drop_all(self) -> None:
        """Every test starts from an empty server (collection names follow the model, so tests would share them)."""
        client = self.client()
        try:
            for name in client.list_collections():
                for alias in client.list_aliases(name).get("aliases", []):
                    client.drop_alias(alias)  # Milvus 2.3 keeps an alias whose collection was dropped
                client.drop_collection(name)
        finally:
            client.close()


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusTestServer]:
    pytest.importorskip("milvus", reason=MISSING)
    pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install -r requirements-scale.txt")
    root = Path(tempfile.mkdtemp(prefix="pictrace-milvus-"))
    server = MilvusTestServer(root, _free_port())
    try:
        server.start()
    except RuntimeError as exc:  # etcd's fixed ports taken by another Milvus, an unsupported CPU or libc
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the Milvus test server could not start here: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def milvus_uri(milvus_server: MilvusTestServer) -> str:
    """The session server's URI, with no collection left by an earlier test."""
    if milvus_server.process is None:  # a test that stopped it failed before starting it again
        milvus_server.start()
    milvus_server.drop_all()
    return milvus_server.uri
