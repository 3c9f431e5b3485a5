"""Global image embeddings behind one protocol, so backbones can be swapped without touching the pipeline."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from pictrace.errors import NotReadyError


@runtime_checkable
class Embedder(Protocol):
    """Turns RGB images into L2-normalised float32 vectors; cosine similarity is then a dot product."""

    @property
    def name(self) -> str:
        """Backbone name, recorded with the index so vectors of different models are never mixed."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """Identifies the exact weights (a hash), so a changed model file forces a reindex."""
        ...

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB images of any size → (N, dim) float32, each row of unit length."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxEmbedder:
    """EfficientNet-Lite2 (or any ``pixel_values`` → ``embedding`` ONNX model) on onnxruntime's CPU provider.

    Preprocessing follows the model's SOURCE.md exactly: RGB, bicubic squash to the input size, then
    ``(x - 127) / 128`` (the TF EfficientNet-Lite convention, not ImageNet mean/std).
    """

    def __init__(self, model_path: Path, *, name: str = "efficientnet-lite2", threads: int = 2) -> None:
        import onnxruntime as ort  # imported here: building an embedder is lifespan work, not import work

        if not model_path.is_file():
            raise NotReadyError(f"embedding model not found at {model_path} (set PICTRACE_MODEL_PATH)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self._size = int(model_input.shape[2])
        output = next(o for o in self._session.get_outputs() if o.name == "embedding")
        self._dim = int(output.shape[1])
        self._name = name
        self._fingerprint = file_sha256(model_path)

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        resized = Image.fromarray(rgb).resize((self._size, self._size), Image.Resampling.BICUBIC)
        x = (np.asarray(resized, dtype=np.float32) - 127.0) / 128.0
        return x.transpose(2, 0, 1)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        batch = np.ascontiguousarray(np.stack([self.preprocess(img) for img in images]))
        (vectors,) = self._session.run(["embedding"], {self._input_name: batch})
        return l2_normalise(np.asarray(vectors, dtype=np.float32))


def build_embedder(
    backbone: str, model_path: Path, *, threads: int, resnet50_weights: Path | None = None
) -> Embedder:
    """The one place a backbone name becomes an Embedder."""
    if backbone == "efficientnet-lite2":
        return OnnxEmbedder(model_path, name=backbone, threads=threads)
    if backbone == "resnet50":
        # Imported here: the module needs nothing heavy, but TensorFlow must only load for this backbone.
        from pictrace.features.keras_resnet import KerasResNet50Embedder

        return KerasResNet50Embedder.from_weights(resnet50_weights, threads=threads)
    raise NotReadyError(
        f"unknown backbone {backbone!r} (PICTRACE_BACKBONE); known: efficientnet-lite2, resnet50"
    )
