"""A tiny procedurally drawn world for vision tests.

Each image has a hidden style (a texture family: oriented stripes, checkerboard, dots,
blobs) drawn in two random colours, so colour says nothing about style. The synthetic
"factors" are a per-style prototype plus noise: what ALS would give if users picked
projects by style.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STYLES = 4


@dataclass
class World:
    paths: list[str]
    styles: np.ndarray  # int N
    factors: np.ndarray  # float32 N x dim


def texture(style: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean size x size mask of one texture family."""
    y, x = np.mgrid[0:size, 0:size] / size
    freq, phase = rng.uniform(4, 7), rng.uniform(0, 2 * np.pi)
    if style == 0:
        angle = rng.uniform(0, np.pi)
        return np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase) > 0
    if style == 1:
        return np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y) > 0
    if style == 2:
        cx, cy = (x * freq + phase) % 1 - 0.5, (y * freq) % 1 - 0.5
        return cx ** 2 + cy ** 2 < 0.06
    coarse = rng.random((5, 5))
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)) / 255
    return smooth > np.median(smooth)


def draw(style: int, size: int, rng: np.random.Generator) -> np.ndarray:
    mask = texture(style, size, rng)[..., None]
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    image = np.where(mask, first, second) + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_world(root: Path, n: int = 200, size: int = 40, dim: int = 8, noise: float = 0.35,
               seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(STYLES, dim))
    styles = np.arange(n) % STYLES
    rng.shuffle(styles)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, style in enumerate(styles):
        path = root / f"p{i:04d}.png"
        Image.fromarray(draw(int(style), size, rng)).save(path)
        paths.append(str(path))
    factors = prototypes[styles] + noise * rng.normal(size=(n, dim))
    return World(paths, styles, factors.astype(np.float32))


def solid_colours(root: Path, per_class: int = 10, size: int = 32,
                  seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Images of three colour classes (reddish, greenish, bluish) with random textures."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for label in range(3):
        for i in range(per_class):
            base = np.full(3, 40.0)
            base[label] = 200
            shade = rng.uniform(0.6, 1.0, (size, size, 1)) * texture(i % STYLES, size, rng)[
                ..., None].clip(0.7, 1.0)
            image = np.clip(base * shade + rng.normal(0, 8, (size, size, 3)), 0, 255)
            path = root / f"c{label}_{i}.png"
            Image.fromarray(image.astype(np.uint8)).save(path)
            paths.append(str(path))
            labels.append(label)
    return paths, np.array(labels)
