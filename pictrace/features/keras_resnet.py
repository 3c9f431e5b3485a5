"""The original PicTrace's backbone: Keras ResNet50 (ImageNet, no top, global average pooling), 2048-d.

Optional (``pip install -r requirements-tensorflow.txt``): TensorFlow is imported only when this backbone is built
in the lifespan, never when pictrace is imported. Weights come from a local file (``PICTRACE_RESNET50_WEIGHTS``)
or Keras' own cache/download; if neither works the service refuses to start rather than embed with random weights.

Preprocessing fixes the original's bug: it handed OpenCV's BGR arrays to ``preprocess_input``, which expects RGB
(it flips RGB→BGR itself and subtracts the ImageNet BGR means), so every image was embedded with swapped channels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pictrace.errors import ModelWeightsError
from pictrace.features.embed import file_sha256, l2_normalise

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

NAME = "resnet50"
DIM = 2048
INPUT_SIZE = 224
# Keras' own file for ResNet50(weights="imagenet", include_top=False), with the MD5 Keras checks it against.
IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_ORIGIN = (
    f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{IMAGENET_NOTOP_FILE}"
)
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded files: ``$KERAS_HOME`` or ``~/.keras`` (as Keras itself decides)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _import_keras() -> Any:
    try:
        import keras
        import tensorflow  # noqa: F401  (Keras' backend here; also what configure_threads tunes)
    except ImportError as exc:
        raise ModelWeightsError(
            "PICTRACE_BACKBONE=resnet50 needs TensorFlow: pip install -r requirements-tensorflow.txt "
            f"({exc})"
        ) from exc
    return keras


def _missing_message(detail: str, cache_file: Path) -> str:
    return (
        f"no ResNet50 weights: {detail}. Either set PICTRACE_RESNET50_WEIGHTS to a local .h5 or .weights.h5 "
        f"file (e.g. a copy of Keras' {IMAGENET_NOTOP_FILE}), or put that file in Keras' cache at {cache_file} "
        "(Keras downloads it there when the machine can reach storage.googleapis.com). "
        "PicTrace never embeds with random weights."
    )


def resolve_weights(
    explicit: Path | None,
    *,
    cache_dir: Path | None = None,
    origin: str = IMAGENET_NOTOP_ORIGIN,
) -> Path:
    """The weights file to load: ``explicit`` if given (it must exist), else Keras' cached or downloaded copy.

    An explicit path that does not exist is an error, not a reason to fall back to the download: the operator
    asked for those weights, and a silently different model would make the index lie.
    """
    cache_dir = cache_dir or keras_cache_dir()
    cache_file = cache_dir / "models" / IMAGENET_NOTOP_FILE
    if explicit is not None:
        if not explicit.is_file():
            detail = f"PICTRACE_RESNET50_WEIGHTS={explicit} is not a file"
            raise ModelWeightsError(_missing_message(detail, cache_file))
        return explicit
    keras = _import_keras()
    try:
        path = keras.utils.get_file(
            IMAGENET_NOTOP_FILE,
            origin,
            cache_subdir="models",
            cache_dir=str(cache_dir),
            file_hash=IMAGENET_NOTOP_MD5,
        )
    except Exception as exc:  # Keras raises a bare Exception for every download failure
        raise ModelWeightsError(
            _missing_message(f"not in Keras' cache and the download failed ({exc})", cache_file)
        ) from exc
    return Path(path)


def build_resnet50(weights: Path | None) -> keras.Model:
    """ResNet50 without its top, average-pooled to 2048-d; ``weights=None`` gives random weights (tests only).

    ``.weights.h5`` files (Keras 3 ``save_weights``) and legacy ``.h5`` files (Keras' own ImageNet file, or a
    whole model saved as .h5) are both accepted; a file that does not fit the architecture is an error.
    """
    keras = _import_keras()
    model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")
    if weights is not None:
        try:
            model.load_weights(str(weights))
        except Exception as exc:  # h5py/Keras raise ValueError, OSError, KeyError... for a file that does not fit
            raise ModelWeightsError(
                f"cannot load ResNet50 weights from {weights} ({type(exc).__name__}: {exc}); the file must hold "
                "the weights of keras.applications.ResNet50(include_top=False) as .h5 or .weights.h5"
            ) from exc
    return model


def configure_threads(threads: int) -> None:
    """TensorFlow's thread pools are per process and fixed once it has run an op; set them if still possible."""
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as exc:  # TensorFlow was already initialised in this process (a second embedder)
        log.warning("TensorFlow already running; its thread settings stay as they are (%s)", exc)


def preprocess(images: Sequence[np.ndarray]) -> np.ndarray:
    """RGB uint8 images → (N, 224, 224, 3) float32 ready for ResNet50.

    Squashed to 224×224 (no crop, as the original), then Keras' own ``preprocess_input`` on the **RGB** array:
    it converts to BGR and subtracts the ImageNet means itself ("caffe" mode).
    """
    from keras.applications.resnet50 import preprocess_input

    batch = np.stack(
        [
            np.asarray(
                Image.fromarray(rgb).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
            for rgb in images
        ]
    )
    return np.asarray(preprocess_input(batch), dtype=np.float32)


class KerasResNet50Embedder:
    """The Embedder protocol over a Keras ResNet50 model; ``fingerprint`` is the weights file's SHA-256."""

    def __init__(self, model: keras.Model, fingerprint: str, *, name: str = NAME) -> None:
        if model.output_shape != (None, DIM):
            raise ModelWeightsError(f"expected a ResNet50 with {DIM}-d pooled output, got {model.output_shape}")
        self._model = model
        self._fingerprint = fingerprint
        self._name = name
        # Trace the predict function now, at start, so the first request does not pay for it (nor race on it).
        self.embed([np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)])

    @classmethod
    def from_weights(cls, weights: Path | None, *, threads: int) -> KerasResNet50Embedder:
        """Build from ``PICTRACE_RESNET50_WEIGHTS`` (or Keras' cache/download when it is unset)."""
        _import_keras()
        configure_threads(threads)
        path = resolve_weights(weights)
        model = build_resnet50(path)
        log.info("ResNet50 weights loaded from %s", path)
        return cls(model, file_sha256(path))

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return DIM

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        # predict_on_batch runs a compiled function: ~7x faster than calling the model eagerly at batch 1.
        vectors = self._model.predict_on_batch(preprocess(images))
        return l2_normalise(np.asarray(vectors, dtype=np.float32))
