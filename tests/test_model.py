"""Backbones: real ImageNet semantics for the embedded one, shapes for the Keras ones."""

from __future__ import annotations

import numpy as np
import pytest

from cbir import categories
from cbir.errors import WeightsMissing
from cbir.images import load_image
from cbir.model import BACKBONES, Timings, build_keras_model, load_model, resolve_weights
from tests.conftest import TESTDATA, needs_shared

DOMESTIC_CATS = {"n02123045", "n02123159", "n02123394", "n02123597", "n02124075"}


@needs_shared
def test_cat_photo_has_a_cat_category_in_its_top_four(lite0):
    pixels = load_image(TESTDATA / "photos" / "animals" / "chelsea.jpg", 224)
    described = lite0.describe(pixels[None])
    top4 = {categories.wnids()[i] for i in np.argsort(-described.probs[0])[:4]}
    assert top4 & DOMESTIC_CATS
    assert described.probs.shape == (1, 1000)
    assert abs(described.probs.sum() - 1) < 1e-3


@needs_shared
def test_features_are_unit_rows_and_similar_images_score_higher(lite0):
    names = ["photos/animals/chelsea.jpg", "near_duplicates/chelsea__hflip.jpg",
             "photos/vehicles/rocket.jpg"]  # fmt: skip
    batch = np.stack([load_image(TESTDATA / n, 224) for n in names])
    described = lite0.describe(batch)
    for pooling in ("gap", "gem"):
        f = described.features[pooling]
        assert f.shape == (3, 1280) and f.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, atol=1e-4)
        assert f[0] @ f[1] > f[0] @ f[2] + 0.2


@needs_shared
def test_engines_agree_with_tensorflow_float32(lite0):
    pixels = np.stack(
        [load_image(p, 224) for p in sorted((TESTDATA / "photos").rglob("*.jpg"))[:8]]
    )
    reference = load_model("efficientnet_lite0", engine="tensorflow").describe(pixels)
    fast = lite0.describe(pixels)
    cosine = (reference.features["gap"] * fast.features["gap"]).sum(axis=1)
    assert cosine.min() > 0.99, f"{lite0.engine}/{lite0.precision} features drift: {cosine}"
    assert (reference.probs.argmax(1) == fast.probs.argmax(1)).mean() >= 7 / 8


@pytest.mark.parametrize("name", ["inception_resnet_v2", "resnet50", "xception", "efficientnet_b0"])
def test_keras_backbones_give_probabilities_and_features_of_the_table_shape(name):
    backbone = BACKBONES[name]
    keras_model = build_keras_model(backbone, resolve_weights(backbone, "none"), Timings())
    size = backbone.input_size
    probs, gap, gem = keras_model(np.zeros((2, size, size, 3), np.uint8), training=False)
    assert tuple(probs.shape) == (2, 1000)
    assert tuple(gap.shape) == tuple(gem.shape) == (2, backbone.feature_dim)


def test_missing_imagenet_weights_offline_say_what_file_and_how_to_fix():
    with pytest.raises(WeightsMissing) as caught:
        load_model("inception_resnet_v2", "imagenet")
    message = str(caught.value)
    assert "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5" in message
    assert "--weights FILE" in message and "efficientnet_lite0" in message


def test_a_weights_file_that_does_not_fit_is_a_clear_error(tmp_path):
    bad = tmp_path / "wrong.weights.h5"
    bad.write_bytes(b"not weights")
    with pytest.raises(WeightsMissing, match="cannot load weights"):
        load_model("efficientnet_lite0", str(bad), "tensorflow")
