"""The scale-out vector index: Milvus through ``pymilvus``' ``MilvusClient``.

A file path runs Milvus Lite in-process (single process); an ``http://host:19530`` URI talks to a Milvus
standalone or cluster that several PicTrace replicas share (tested against Milvus 2.3.5, see docs/scaling.md).

- The collection's name says which model made its vectors (backbone, dimension, weights), so two models never
  mix; one of that name with another dimension or model is refused at start.
- That name is an alias: ``reindex`` fills a new collection while searches go on in the old one, then moves the
  alias and drops the old collection.
- Searches do not wait for the server's next time tick (Strong consistency costs 150–400 ms a search on 2.3):
  they read what the server holds, where other processes' writes show within a tick (~0.2 s). For a while after
  its own write a process searches Strong, so it always sees its own adds and deletes (Milvus 2.3 returns no
  timestamp for a delete, so the client's Session level does not cover them).
- Every request has a timeout; a server that is down, failing or slow raises VectorStoreUnavailableError (503),
  and the client reconnects by itself when the server is back.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from pictrace.errors import IndexMismatchError, VectorStoreUnavailableError
from pictrace.indexes.vector.base import IndexInfo

_BATCH = 2000
_SEARCH_PARAMS = {"metric_type": "IP"}
_OWN_WRITES_S = 2.0  # searches this long after this process's last write wait for the server to apply it
T = TypeVar("T")


def collection_name(info: IndexInfo) -> str:
    """One collection per model (backbone, weights, dimension), so vectors of two models never mix: another
    model finds its own, empty collection and fills it from the catalogue. Letters, digits, underscores."""
    return re.sub(r"[^0-9A-Za-z_]", "_", f"pictrace_{info.backbone}_{info.dim}_{info.fingerprint[:12]}")


class MilvusIndex:
    """``VectorIndex`` on a Milvus collection (primary key = catalogue vec_id, metric = inner product)."""

    def __init__(
        self, uri: str, info: IndexInfo, *, collection: str | None = None, token: str = "", timeout_s: float = 10.0
    ) -> None:
        from pymilvus import MilvusClient
        from pymilvus.client.utils import SciPyHelper

        # pymilvus checks for scipy.sparse on its first search by executing a fresh copy of the module, which
        # is not thread-safe: two searches at once (an ingest's parallel linking) failed with a half-imported
        # scipy. Done once here, before any search.
        SciPyHelper._init()
        self._info = info
        self._uri = uri
        self._name = collection or collection_name(info)  # the alias every request names
        self._timeout = timeout_s
        self._client = self._call("connect", lambda: MilvusClient(uri=uri, token=token, timeout=timeout_s))
        self._write = threading.Lock()  # Milvus Lite serialises writes; one writer at a time here too
        self._wrote_at = -_OWN_WRITES_S
        self._call("open", self._open_collection)

    def _call(self, what: str, request: Callable[[], T]) -> T:
        """Run one request, turning the client's connection and server errors into VectorStoreUnavailableError."""
        import grpc
        from pymilvus.exceptions import MilvusException

        try:
            return request()
        except (MilvusException, grpc.RpcError) as exc:
            reason = getattr(exc, "message", None) or (exc.details() if isinstance(exc, grpc.Call) else "") or exc
            raise VectorStoreUnavailableError(
                f"the vector store (Milvus at {self._uri}) failed to {what}: {str(reason).splitlines()[0][:200]}"
            ) from exc

    def _description(self) -> str:
        info = self._info
        return json.dumps({"backbone": info.backbone, "fingerprint": info.fingerprint, "dim": info.dim})

    def _open_collection(self) -> None:
        from pymilvus.exceptions import MilvusException

        client = self._client
        if not client.has_collection(self._name):
            physical = self._create_collection()
            try:
                client.create_alias(physical, self._name)
                return
            except MilvusException:
                client.drop_collection(physical)
                if not client.has_collection(self._name):
                    raise
                # another process (a worker started beside this one) created it first: use theirs
        self._check_model(client.describe_collection(self._name))
        client.load_collection(self._name)

    def _check_model(self, described: dict[str, Any]) -> None:
        """Refuse a collection of this name holding another model's vectors (another dimension, or another
        backbone or weights file by its description; Milvus Lite keeps no description, only the dimension)."""
        dim = next((int(f.get("params", {}).get("dim", 0)) for f in described.get("fields", [])
                    if f.get("name") == "vector"), 0)
        try:
            stored = json.loads(described.get("description") or "{}")
        except ValueError:
            stored = {}
        if not isinstance(stored, dict):
            stored = {}
        ours = self._info
        other = (stored.get("backbone", ours.backbone), stored.get("fingerprint", ours.fingerprint))
        if dim != ours.dim or other != (ours.backbone, ours.fingerprint):
            raise IndexMismatchError(
                f"Milvus collection {self._name} at {self._uri} holds vectors of {other[0]} (dim {dim}, weights "
                f"{str(other[1])[:12]}), not of {ours.backbone} (dim {ours.dim}, weights {ours.fingerprint[:12]}): "
                "drop it or point PICTRACE_MILVUS_URI at another server"
            )

    def _create_collection(self) -> str:
        """A new, empty, loaded collection for this model under a unique physical name; returns that name."""
        from pymilvus import DataType

        client = self._client
        physical = f"{self._name}_{time.time_ns():x}"
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=self._description())
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._info.dim)
        index_params = client.prepare_index_params()
        # AUTOINDEX: HNSW-class on a Milvus server, the flat index Milvus Lite supports
        index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
        client.create_collection(physical, schema=schema, index_params=index_params, consistency_level="Strong")
        return physical

    @property
    def info(self) -> IndexInfo:
        return self._info

    def __len__(self) -> int:
        rows = self._call("count", lambda: self._client.query(
            self._name, filter="", output_fields=["count(*)"], timeout=self._timeout))
        return int(rows[0]["count(*)"])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self._info.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self._info.dim}) vectors, got {vectors.shape}")
        with self._write:
            self._upsert(self._name, ids, vectors)

    def _upsert(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(ids), _BATCH):
            rows = [
                {"id": int(i), "vector": v}
                for i, v in zip(ids[start : start + _BATCH].tolist(), vectors[start : start + _BATCH], strict=True)
            ]
            self._call("add vectors", lambda: self._client.upsert(name, rows, timeout=self._timeout))  # noqa: B023
            self._wrote_at = time.monotonic()

    def _existing(self, ids: list[int]) -> list[int]:
        found: list[int] = []
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            rows = self._call("look up ids", lambda: self._client.query(
                self._name, filter=f"id in {chunk}", output_fields=["id"], timeout=self._timeout))  # noqa: B023
            found.extend(int(r["id"]) for r in rows)
        return found

    def remove(self, ids: np.ndarray) -> int:
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).tolist()]
        if not wanted:
            return 0
        with self._write:
            present = self._existing(wanted)  # delete() reports the keys it was given, not the rows it removed
            if present:
                self._call("remove vectors",
                           lambda: self._client.delete(self._name, ids=present, timeout=self._timeout))
                self._wrote_at = time.monotonic()
        return len(present)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(vectors)
        scores = np.zeros((n, k), np.float32)
        found = np.full((n, k), -1, np.int64)
        if n == 0 or k <= 0:
            return scores[:, :0], found[:, :0]
        level = "Strong" if time.monotonic() - self._wrote_at < _OWN_WRITES_S else "Session"
        hits = self._call("search", lambda: self._client.search(
            self._name, data=list(vectors), limit=k, output_fields=["id"], search_params=_SEARCH_PARAMS,
            consistency_level=level, timeout=self._timeout,
        ))
        width = 0
        for row, row_hits in enumerate(hits):
            for col, hit in enumerate(row_hits):
                found[row, col] = int(hit["id"])
                scores[row, col] = float(hit["distance"])
            width = max(width, len(row_hits))
        return scores[:, :width], found[:, :width]

    def ids(self) -> np.ndarray:
        def read() -> list[int]:
            out: list[int] = []
            iterator = self._client.query_iterator(
                self._name, filter="", output_fields=["id"], batch_size=_BATCH, timeout=self._timeout)
            try:
                while batch := iterator.next():
                    out.extend(int(r["id"]) for r in batch)
            finally:
                iterator.close()
            return out

        return np.array(self._call("list ids", read), dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).tolist()]
        present = set(self._existing(wanted))
        return np.array([i in present for i in wanted], dtype=bool)

    def needs_rebuild(self) -> bool:
        return False  # Milvus compacts deletes and chooses its segment indexes itself

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], expected: int | None = None) -> None:
        """Load the catalogue's vectors into a new collection, then move the alias onto it and drop the old one
        (``pictrace reindex``): searches go on in the old collection meanwhile. Vectors other processes add
        during the load land in the old one; the caller reconciles the new one with the catalogue after."""
        client = self._client
        with self._write:
            physical = self._call("create a collection", self._create_collection)
            try:
                for ids, vectors in batches:
                    self._upsert(physical, np.ascontiguousarray(ids, dtype=np.int64),
                                 np.ascontiguousarray(vectors, dtype=np.float32))
                self._call("flush", lambda: client.flush(physical))
                self._call("switch collections", lambda: self._switch_to(physical))
            except BaseException:
                self._call("drop the unfinished collection", lambda: client.drop_collection(physical))
                raise

    def _switch_to(self, physical: str) -> None:
        client = self._client
        described = client.describe_collection(self._name)
        old = described.get("collection_name", self._name)
        if old == self._name:  # a collection made before aliases were used: it must go before its name is free
            client.drop_collection(self._name)
            client.create_alias(physical, self._name)
        else:
            client.alter_alias(physical, self._name)
            client.drop_collection(old)

    def save(self) -> None:
        with self._write:
            self._call("flush", lambda: self._client.flush(self._name))

    def reload(self) -> None:
        """Release and load the collection: Milvus Lite builds each flushed segment's index in the background,
        and loading builds (or reads back) all of them now, so searches after it meet finished indexes."""
        with self._write:
            self._call("reload", lambda: self._client.release_collection(self._name))
            self._call("reload", lambda: self._client.load_collection(self._name))

    def close(self) -> None:
        """Close the client; for Milvus Lite also stop its in-process server, which holds the file's lock
        (without this, no other process, and no later index in this one, could open the file afresh)."""
        self._client.close()
        if self._uri.endswith(".db"):  # pymilvus runs a Milvus Lite server in this process for a .db path
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self._uri)
