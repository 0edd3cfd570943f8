import numpy as np

from services.evaluate.features import handcrafted_features, lbp_histogram, rgb_to_hsv
from services.evaluate.metrics import map_at_k
from tests.synth import STYLES, draw, solid_colours


def test_colour_classes_separate(tmp_path):
    paths, labels = solid_colours(tmp_path, per_class=8)
    features = handcrafted_features(paths, image_size=32)
    assert features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    assert map_at_k(features, labels, k=5) > 0.95


def test_texture_blocks_separate_styles_with_random_colours():
    rng = np.random.default_rng(0)
    styles = np.repeat(np.arange(STYLES), 10)
    pixels = np.stack([draw(int(s), 48, rng) for s in styles])
    features = handcrafted_features(pixels)
    colour_only = features[:, :128]
    assert map_at_k(features[:, 128:], styles) > map_at_k(colour_only, styles) + 0.2


def test_hsv_matches_known_colours():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    hsv = rgb_to_hsv(pixels)[0]
    np.testing.assert_allclose(hsv[:, 0], [0, 1 / 3, 2 / 3, 0], atol=1e-6)
    np.testing.assert_allclose(hsv[:, 1], [1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(hsv[3, 2], 128 / 255, atol=1e-6)


def test_lbp_of_a_flat_image_is_all_ones_code():
    hist = lbp_histogram(np.full((2, 5, 5), 7.0, np.float32))
    assert hist[:, 255].tolist() == [9, 9] and hist.sum() == 18
