"""The scale-out vector index: Milvus through ``pymilvus``' ``MilvusClient``.

A file path runs Milvus Lite in-process (single process: what the tests use); an ``http://host:19530`` URI
talks to a Milvus standalone or cluster that several PicTrace replicas share. The collection records which
backbone made its vectors (in its description), so vectors of two models are never mixed.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable

import numpy as np

from pictrace.indexes.vector.base import IndexInfo

_BATCH = 2000


def collection_name(info: IndexInfo) -> str:
    """One collection per model (backbone, weights, dimension), so vectors of two models never mix: another
    model finds its own, empty collection and fills it from the catalogue. Letters, digits, underscores."""
    return re.sub(r"[^0-9A-Za-z_]", "_", f"pictrace_{info.backbone}_{info.dim}_{info.fingerprint[:12]}")


class MilvusIndex:
    """``VectorIndex`` on a Milvus collection (primary key = catalogue vec_id, metric = inner product)."""

    def __init__(self, uri: str, info: IndexInfo, *, collection: str | None = None, token: str = "") -> None:
        from pymilvus import MilvusClient

        self._info = info
        self._uri = uri
        self._name = collection or collection_name(info)
        self._client = MilvusClient(uri=uri, token=token)
        self._write = threading.Lock()  # Milvus Lite serialises writes; one writer at a time here too
        self._ensure_collection()

    def _description(self) -> str:
        info = self._info
        return json.dumps({"backbone": info.backbone, "fingerprint": info.fingerprint, "dim": info.dim})

    def _ensure_collection(self) -> None:
        from pymilvus import DataType

        client = self._client
        if client.has_collection(self._name):
            client.load_collection(self._name)
            return
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=self._description())
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._info.dim)
        index_params = client.prepare_index_params()
        # AUTOINDEX: HNSW-class on a Milvus server, the flat index Milvus Lite supports
        index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
        client.create_collection(
            self._name, schema=schema, index_params=index_params, consistency_level="Strong"
        )

    @property
    def info(self) -> IndexInfo:
        return self._info

    def __len__(self) -> int:
        rows = self._client.query(self._name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self._info.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self._info.dim}) vectors, got {vectors.shape}")
        with self._write:
            for start in range(0, len(ids), _BATCH):
                rows = [
                    {"id": int(i), "vector": v}
                    for i, v in zip(ids[start : start + _BATCH].tolist(), vectors[start : start + _BATCH], strict=True)
                ]
                self._client.upsert(self._name, rows)

    def _existing(self, ids: list[int]) -> list[int]:
        found: list[int] = []
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            rows = self._client.query(self._name, filter=f"id in {chunk}", output_fields=["id"])
            found.extend(int(r["id"]) for r in rows)
        return found

    def remove(self, ids: np.ndarray) -> int:
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).tolist()]
        if not wanted:
            return 0
        with self._write:
            present = self._existing(wanted)  # delete() reports the keys it was given, not the rows it removed
            if present:
                self._client.delete(self._name, ids=present)
        return len(present)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(vectors)
        scores = np.zeros((n, k), np.float32)
        found = np.full((n, k), -1, np.int64)
        if n == 0 or k <= 0:
            return scores[:, :0], found[:, :0]
        hits = self._client.search(
            self._name, data=list(vectors), limit=k, output_fields=["id"], search_params={"metric_type": "IP"}
        )
        width = 0
        for row, row_hits in enumerate(hits):
            for col, hit in enumerate(row_hits):
                found[row, col] = int(hit["id"])
                scores[row, col] = float(hit["distance"])
            width = max(width, len(row_hits))
        return scores[:, :width], found[:, :width]

    def ids(self) -> np.ndarray:
        out: list[int] = []
        iterator = self._client.query_iterator(self._name, filter="", output_fields=["id"], batch_size=_BATCH)
        try:
            while batch := iterator.next():
                out.extend(int(r["id"]) for r in batch)
        finally:
            iterator.close()
        return np.array(out, dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).tolist()]
        present = set(self._existing(wanted))
        return np.array([i in present for i in wanted], dtype=bool)

    def needs_rebuild(self) -> bool:
        return False  # Milvus compacts deletes and chooses its segment indexes itself

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], expected: int | None = None) -> None:
        """Drop the collection and load the catalogue's vectors again (``pictrace reindex``)."""
        with self._write:
            self._client.drop_collection(self._name)
            self._ensure_collection()
        for ids, vectors in batches:
            self.add(ids, vectors)

    def save(self) -> None:
        with self._write:
            self._client.flush(self._name)

    def reload(self) -> None:
        """Release and load the collection: Milvus Lite builds each flushed segment's index in the background,
        and loading builds (or reads back) all of them now, so searches after it meet finished indexes."""
        with self._write:
            self._client.release_collection(self._name)
            self._client.load_collection(self._name)

    def close(self) -> None:
        """Close the client; for Milvus Lite also stop its in-process server, which holds the file's lock
        (without this, no other process, and no later index in this one, could open the file afresh)."""
        self._client.close()
        if self._uri.endswith(".db"):  # pymilvus runs a Milvus Lite server in this process for a .db path
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self._uri)
