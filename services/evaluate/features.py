"""A hand-crafted baseline: colour histogram + gradient and LBP texture histograms.

What a learned feature has to beat without any behaviour data. Every block is an
L1-normalized histogram, square-rooted (Hellinger), so each block has unit L2 norm and
colour and texture weigh alike; the concatenation is scaled back to unit length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.vision import ImageInput, read_pixels

# Gradient magnitude bin edges in grey levels (0..255), log-spaced: texture contrast.
MAGNITUDE_EDGES = np.array([2, 4, 8, 16, 32, 64, 128], dtype=np.float32)
CHUNK = 256


def handcrafted_features(images: Sequence[ImageInput] | np.ndarray,
                         image_size: int = 64) -> np.ndarray:
    """float32 N x D, L2-normalized. `images`: paths/PIL images, or uint8 N x H x W x 3."""
    out = []
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK]
        if not isinstance(chunk, np.ndarray):
            chunk = np.stack([read_pixels(image, image_size) for image in chunk])
        out.append(describe(chunk))
    return np.concatenate(out)


def describe(pixels: np.ndarray) -> np.ndarray:
    """Features of a uint8 N x H x W x 3 batch."""
    gray = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    blocks = [color_histogram(pixels), lbp_histogram(gray)]
    for level in range(2):  # two scales: texture frequency is part of style
        blocks.extend(gradient_histograms(gray))
        if level == 0:
            gray = _halve(gray)
    features = np.concatenate([np.sqrt(_l1(block)) for block in blocks], axis=1)
    return (features / np.sqrt(len(blocks))).astype(np.float32)


def color_histogram(pixels: np.ndarray, bins: tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """Joint HSV histogram (hue gets the most bins: it is what people name a colour by)."""
    hsv = rgb_to_hsv(pixels)
    index = np.zeros(hsv.shape[:3], dtype=np.int64)
    for channel, count in enumerate(bins):
        level = np.minimum((hsv[..., channel] * count).astype(np.int64), count - 1)
        index = index * count + level
    return _per_image_bincount(index, int(np.prod(bins)))


def gradient_histograms(gray: np.ndarray, orientations: int = 8) -> list[np.ndarray]:
    """Magnitude-weighted histogram of unsigned gradient orientations, and a histogram of
    gradient magnitudes (how strong and how frequent edges are)."""
    gx = gray[:, 1:-1, 2:] - gray[:, 1:-1, :-2]
    gy = gray[:, 2:, 1:-1] - gray[:, :-2, 1:-1]
    magnitude = np.hypot(gx, gy)
    angle = np.arctan2(gy, gx) % np.pi
    orient = np.minimum((angle / np.pi * orientations).astype(np.int64), orientations - 1)
    weighted = _per_image_bincount(orient, orientations, weights=magnitude)
    levels = np.searchsorted(MAGNITUDE_EDGES, magnitude)
    return [weighted, _per_image_bincount(levels, len(MAGNITUDE_EDGES) + 1)]


def lbp_histogram(gray: np.ndarray) -> np.ndarray:
    """Histogram of 8-neighbour local binary patterns (radius 1), 256 codes."""
    center = gray[:, 1:-1, 1:-1]
    h, w = center.shape[1:]
    codes = np.zeros(center.shape, dtype=np.int64)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    for bit, (dy, dx) in enumerate(offsets):
        neighbour = gray[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        codes |= (neighbour >= center).astype(np.int64) << bit
    return _per_image_bincount(codes, 256)


def rgb_to_hsv(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float HSV, all channels in [0, 1]."""
    rgb = pixels.astype(np.float32) / 255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    delta = high - low
    safe = np.where(delta > 0, delta, 1)
    hue = np.where(high == r, (g - b) / safe % 6,
                   np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue / 6, 0)
    saturation = np.where(high > 0, delta / np.where(high > 0, high, 1), 0)
    return np.stack([hue, saturation, high], axis=-1)


def _per_image_bincount(index: np.ndarray, bins: int,
                        weights: np.ndarray | None = None) -> np.ndarray:
    # One bincount over all images at once: offset each image's bins by image * bins.
    n = index.shape[0]
    flat = (index.reshape(n, -1) + np.arange(n)[:, None] * bins).ravel()
    w = None if weights is None else weights.reshape(-1)
    return np.bincount(flat, weights=w, minlength=n * bins).reshape(n, bins)


def _l1(hist: np.ndarray) -> np.ndarray:
    hist = hist.astype(np.float64)
    return hist / np.maximum(hist.sum(1, keepdims=True), 1e-12)


def _halve(gray: np.ndarray) -> np.ndarray:
    n, h, w = gray.shape
    h, w = h - h % 2, w - w % 2
    return gray[:, :h, :w].reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))
