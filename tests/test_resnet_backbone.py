"""The optional Keras ResNet50 backbone: weights from a file or refused loudly, RGB preprocessing, no mixed index.

Random weights (``weights=None``) stand in for ImageNet's: the machine has no internet, and what is tested here is
the plumbing (loading, channel order, provenance), which does not depend on what the weights learned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import ImageServer, encode

pytest.importorskip(
    "tensorflow", reason="tensorflow-cpu is not installed (pip install -r requirements-tensorflow.txt)"
)

import keras
from keras.applications.resnet50 import preprocess_input

from pictrace.config import Settings
from pictrace.errors import IndexMismatchError, ModelWeightsError
from pictrace.features.embed import Embedder, build_embedder, file_sha256
from pictrace.features.keras_resnet import (
    DIM,
    IMAGENET_NOTOP_FILE,
    KerasResNet50Embedder,
    build_resnet50,
    preprocess,
    resolve_weights,
)
from pictrace.gallery import load_gallery
from pictrace.indexes.vector import FaissIndex, IndexInfo
from pictrace.service import Service

# TensorFlow 2.21 under numpy 2 warns on every tensor→array conversion (np.array(tensor, copy=False) fallback);
# the values are right, the warning is TensorFlow's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

IMAGENET_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype=np.float32)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """One random-weights ResNet50 for the whole module (building one takes seconds)."""
    keras.utils.set_random_seed(0)
    return build_resnet50(None)


@pytest.fixture(scope="module")
def reference(model: keras.Model) -> KerasResNet50Embedder:
    return KerasResNet50Embedder(model, fingerprint="in-memory")


@pytest.fixture(scope="module")
def weights(model: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The module's model saved as Keras 3 ``.weights.h5`` and as a legacy whole-model ``.h5``, plus a second,
    different ``.weights.h5`` (one kernel nudged) to stand for another fine-tune of the same architecture."""
    folder = tmp_path_factory.mktemp("weights")
    files = {"weights.h5": folder / "a.weights.h5", "h5": folder / "a.h5", "other": folder / "b.weights.h5"}
    model.save_weights(files["weights.h5"])
    model.save(files["h5"])
    original = model.get_weights()
    model.set_weights([original[0] + 0.5, *original[1:]])
    model.save_weights(files["other"])
    model.set_weights(original)
    return files


def two_colour_image() -> np.ndarray:
    """Pure red left, pure blue right, a green band: swapping R and B changes every pixel but the band."""
    rgb = np.zeros((224, 224, 3), dtype=np.uint8)
    rgb[:, :112, 0] = 255
    rgb[:, 112:, 2] = 255
    rgb[100:124, :, 1] = 200
    return rgb


def test_importing_pictrace_does_not_import_tensorflow() -> None:
    """TensorFlow (seconds to import, ~1 GB) loads only when the resnet50 backbone is built in the lifespan."""
    code = (
        "import sys, pictrace.cli, pictrace.service, pictrace.web.app, pictrace.features.keras_resnet; "
        "sys.exit(' '.join(sorted({'tensorflow', 'keras'} & set(sys.modules))) or 0)"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_model_builds_without_weights(model: keras.Model, reference: KerasResNet50Embedder) -> None:
    assert model.output_shape == (None, DIM)
    assert isinstance(reference, Embedder)
    assert (reference.name, reference.dim) == ("resnet50", 2048)
    images = [two_colour_image(), np.full((300, 180, 3), 90, dtype=np.uint8)]
    vectors = reference.embed(images)
    assert vectors.shape == (2, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert reference.embed([]).shape == (0, DIM)


@pytest.mark.parametrize("kind", ["weights.h5", "h5"])
def test_weights_file_loads_through_the_setting(
    kind: str,
    weights: dict[str, Path],
    reference: KerasResNet50Embedder,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    photos: dict[str, np.ndarray],
) -> None:
    monkeypatch.setenv("PICTRACE_RESNET50_WEIGHTS", str(weights[kind]))
    settings = make_settings(backbone="resnet50")
    assert settings.resnet50_weights == weights[kind]
    embedder = build_embedder(
        settings.backbone, settings.model_path, threads=1, resnet50_weights=settings.resnet50_weights
    )
    assert isinstance(embedder, KerasResNet50Embedder)
    assert embedder.fingerprint == file_sha256(weights[kind])
    images = [photos["coffee"], photos["rocket"], two_colour_image()]
    loaded = embedder.embed(images)
    assert loaded.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(loaded, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(loaded, reference.embed(images), rtol=0, atol=1e-6)


def test_a_fresh_random_model_embeds_differently(reference: KerasResNet50Embedder, photos: dict) -> None:
    """Guards the test above: had loading silently kept random weights, the embeddings would not agree."""
    other = KerasResNet50Embedder(build_resnet50(None), fingerprint="other")
    images = [photos["coffee"]]
    assert np.abs(other.embed(images) - reference.embed(images)).max() > 1e-3


def test_preprocessing_is_fed_rgb(model: keras.Model, reference: KerasResNet50Embedder) -> None:
    rgb = two_colour_image()
    batch = preprocess([rgb])
    assert batch.shape == (1, 224, 224, 3) and batch.dtype == np.float32
    # By hand: Keras' "caffe" mode takes RGB, flips it to BGR and subtracts the ImageNet BGR means.
    by_hand = rgb[..., ::-1].astype(np.float32) - IMAGENET_BGR_MEANS
    np.testing.assert_allclose(batch[0], by_hand, atol=1e-4)
    np.testing.assert_allclose(batch[0, 0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-4)  # red pixel
    np.testing.assert_allclose(batch[0], preprocess_input(rgb.astype(np.float32)), atol=1e-4)
    # The original's bug: OpenCV's BGR array handed to preprocess_input gives another input altogether...
    bgr_fed = preprocess_input(rgb[..., ::-1].astype(np.float32))
    assert np.abs(bgr_fed - batch[0]).max() > 200
    # ...and another embedding; the embedder's output is the RGB-fed one.
    rgb_vector = reference.embed([rgb])[0]
    by_hand_vector = model.predict_on_batch(by_hand[None])[0]
    bgr_vector = model.predict_on_batch(bgr_fed[None])[0]
    np.testing.assert_allclose(rgb_vector, by_hand_vector / np.linalg.norm(by_hand_vector), atol=1e-5)
    assert np.abs(rgb_vector - bgr_vector / np.linalg.norm(bgr_vector)).max() > 1e-3


def test_threads_of_the_work_pool_can_embed_at_once(
    reference: KerasResNet50Embedder, photos: dict[str, np.ndarray]
) -> None:
    """The service embeds from several executor threads; each must get its own images' vectors back."""
    batches = [[photos["coffee"]], [photos["rocket"], photos["chelsea"]], [photos["brick"]] * 3, [photos["coins"]]]
    serial = [reference.embed(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(reference.embed, batches * 2))
    for got, expected in zip(parallel, serial * 2, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def assert_names_both_options(message: str) -> None:
    assert "PICTRACE_RESNET50_WEIGHTS" in message
    assert str(Path("models") / IMAGENET_NOTOP_FILE) in message  # Keras' cache, where its download lands
    assert "random weights" in message


async def test_missing_weights_file_stops_the_service(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(backbone="resnet50", resnet50_weights=tmp_path / "nowhere.weights.h5")
    with pytest.raises(ModelWeightsError) as caught:
        await Service.start(settings)
    assert_names_both_options(str(caught.value))
    assert "nowhere.weights.h5" in str(caught.value)


def test_no_setting_no_cache_and_a_failed_download_is_an_error(
    image_server: ImageServer, tmp_path: Path
) -> None:
    with pytest.raises(ModelWeightsError) as caught:
        resolve_weights(None, cache_dir=tmp_path / "keras", origin=image_server.url("missing.h5"))
    assert_names_both_options(str(caught.value))
    assert "download failed" in str(caught.value)
    assert image_server.hits["/missing.h5"] >= 1  # it did try Keras' download before giving up


def test_a_file_that_is_not_resnet50_weights_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not an HDF5 file")
    with pytest.raises(ModelWeightsError, match="cannot load ResNet50 weights"):
        build_embedder("resnet50", Path("unused.onnx"), threads=1, resnet50_weights=bogus)


async def index_one_photo(settings: Settings, photos: dict[str, np.ndarray]) -> int:
    (settings.db.parent / "coffee.jpg").write_bytes(encode(photos["coffee"]))
    settings.db.write_text(json.dumps([{"id": "coffee", "url": "coffee.jpg"}]))
    service = await Service.start(settings)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(settings.db))
        return report.added
    finally:
        await service.close()


async def test_a_catalogue_is_never_mixed_across_backbones(
    make_settings: Callable[..., Settings], weights: dict[str, Path], photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    onnx_dir, resnet_dir = tmp_path / "onnx-data", tmp_path / "resnet-data"
    assert await index_one_photo(make_settings(data_dir=onnx_dir), photos) == 1
    resnet_a = make_settings(data_dir=onnx_dir, backbone="resnet50", resnet50_weights=weights["weights.h5"])
    with pytest.raises(IndexMismatchError, match="reindex") as caught:
        await Service.start(resnet_a)
    assert "efficientnet-lite2" in str(caught.value) and "resnet50" in str(caught.value)

    # A fresh data dir indexes with ResNet50; the index file remembers the backbone and the weights' hash.
    resnet_a = make_settings(data_dir=resnet_dir, backbone="resnet50", resnet50_weights=weights["weights.h5"])
    assert await index_one_photo(resnet_a, photos) == 1
    sha_a, sha_b = file_sha256(weights["weights.h5"]), file_sha256(weights["other"])
    assert len(FaissIndex.open(resnet_a.index_path, IndexInfo("resnet50", sha_a, DIM))) == 1
    with pytest.raises(IndexMismatchError, match="reindex"):
        FaissIndex.open(resnet_a.index_path, IndexInfo("resnet50", sha_b, DIM))

    # Same backbone, other weights file: refused too.
    resnet_b = make_settings(data_dir=resnet_dir, backbone="resnet50", resnet50_weights=weights["other"])
    with pytest.raises(IndexMismatchError, match="reindex") as caught:
        await Service.start(resnet_b)
    assert sha_a[:12] in str(caught.value) and sha_b[:12] in str(caught.value)
