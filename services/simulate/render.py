"""Procedural images: a content shape drawn in a style, plus per-image jitter and noise.

Style = palette (colours) x texture (fine pattern) x stroke weight x composition (background
layout); in the structure world colours are drawn per project and a texture scale joins.
Content = a shape at random position, scale and rotation. Every random choice
comes from a generator seeded by (world seed, project index), so an image is the same
whichever process renders it.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from services.simulate.world import CATEGORIES, StyleTable, World, random_palette

STROKE_DUTY = (0.3, 0.55)  # share of a texture period covered by ink, thin vs thick
STROKE_PX = (1.5, 4.0)     # outline width at 128 px, thin vs thick
BASE_PERIOD = (6.0, 7.0, 8.0, 4.0, 7.0, 6.0, 10.0, 5.0)  # texture period at 128 px
NOISE = 0.035


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x + 0.5, y + 0.5


def _rotate(x, y, angle: float):
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return c * x + s * y, -s * x + c * y


def _bars(t, period: float, duty: float):
    """Soft bars covering `duty` of each period along coordinate t."""
    wave = 0.5 - 0.5 * np.cos(t * np.float32(2 * np.pi / period))
    cut = (1 + np.cos(np.pi * duty)) / 2
    return np.clip((wave - np.float32(cut)) * 4 + 0.5, 0, 1)


# -- textures: fields in [0, 1] ---------------------------------------------------------

def _texture(kind: int, rng, size: int, period: float, duty: float) -> np.ndarray:
    x, y = _grid(size)
    xr, yr = _rotate(x, y, rng.uniform(0, np.pi))
    if kind == 0:  # stripes
        return _bars(xr, period, duty)
    if kind == 1:  # dots
        return _bars(xr, period, 0.5 + duty / 2) * _bars(yr, period, 0.5 + duty / 2)
    if kind == 2:  # crosshatch
        return np.maximum(_bars(xr, period, duty * 0.6), _bars(yr, period, duty * 0.6))
    if kind == 3:  # grain: blocky noise, two pixels per grain at 128 px
        block = max(1, round(period / 2))
        cells = rng.random((size // block + 1,) * 2).astype(np.float32)
        grains = np.repeat(np.repeat(cells, block, 0), block, 1)[:size, :size]
        return (grains > 1 - duty).astype(np.float32)
    if kind == 4:  # waves
        return _bars(xr + np.float32(period * 0.6) * np.sin(yr * np.float32(2 / period)),
                     period, duty)
    if kind == 5:  # rings around a point that may lie outside the image
        cx, cy = rng.uniform(-0.5, 1.5, 2) * size
        return _bars(np.hypot(x - np.float32(cx), y - np.float32(cy)), period, duty)
    if kind == 6:  # checker
        a, b = _bars(xr, period, 0.5), _bars(yr, period, 0.5)
        checker = a * b + (1 - a) * (1 - b)
        return checker * np.float32(0.6 + duty * 0.7)
    return _brush(rng, xr, yr, period, duty)


def _brush(rng, xr, yr, period: float, duty: float):
    """Short oriented streaks: a random table indexed by (along, across) cells."""
    length, width = period * 3, period * 0.6
    row = np.floor(yr / np.float32(width)).astype(np.int64)
    shift = ((row * 0.61803) % 1.0).astype(np.float32)  # stagger rows like brick courses
    col = np.floor(xr / np.float32(length) + shift).astype(np.int64)
    table = rng.random(997).astype(np.float32)
    return (table[(row * 131 + col * 31) % 997] > 1 - duty).astype(np.float32)


# -- compositions: background mix in [0, 1] between the two background colours ---------

def _composition(kind: int, rng, size: int) -> np.ndarray:
    x, y = _grid(size)
    if kind == 0:  # linear gradient, roughly left to right
        xr, _ = _rotate(x - size / 2, y - size / 2, rng.normal(0, 0.3))
        return np.clip(xr / size + 0.5, 0, 1)
    if kind == 1:  # radial vignette
        return np.clip(np.hypot(x - size / 2, y - size / 2) / (0.7 * size), 0, 1)
    if kind == 2:  # diagonal split with a hard edge
        offset = rng.normal(0, 0.1) * size
        return np.clip(x + y - size - np.float32(offset), 0, 1)
    band = size * 0.12  # frame
    edge = np.minimum(np.minimum(x, size - x), np.minimum(y, size - y))
    return np.clip(band - edge, 0, 1)


# -- shapes: approximate signed distance in shape units (radius about 1) -----------------

def _box(u, v, half_u: float, half_v: float):
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _polygon(u, v, vertices) -> np.ndarray:
    """Convex polygon, vertices counter-clockwise: max of edge half-plane distances."""
    points = np.asarray(vertices, dtype=np.float32)
    distance = None
    for (ax, ay), (bx, by) in zip(points, np.roll(points, -1, axis=0), strict=True):
        nx, ny = by - ay, ax - bx
        norm = np.hypot(nx, ny)
        d = ((u - ax) * nx + (v - ay) * ny) / norm
        distance = d if distance is None else np.maximum(distance, d)
    return distance


def _regular(n: int, radius: float, phase: float = 0.0):
    angles = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _shape(category: int, u, v) -> np.ndarray:
    name = CATEGORIES[category]
    r = np.hypot(u, v)
    if name == "disk":
        return r - 0.9
    if name == "square":
        return _box(u, v, 0.75, 0.75)
    if name == "triangle":
        return _polygon(u, v, _regular(3, 1.0, np.pi / 2))
    if name == "star":
        theta = np.arctan2(v, u)
        spike = np.abs((theta * np.float32(5 / (2 * np.pi))) % 1 - 0.5) * 2  # 1 at tips
        return (r - (0.4 + 0.6 * spike)) * 0.7
    if name == "plus":
        return np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95))
    if name == "ring":
        return np.abs(r - 0.7) - 0.25
    if name == "crescent":
        return np.maximum(r - 0.95, 0.8 - np.hypot(u - 0.45, v - 0.2))
    if name == "hexagon":
        return _polygon(u, v, _regular(6, 0.9))
    if name == "arrow":
        head = _polygon(u, v, [(1.0, 0.0), (0.15, 0.65), (0.15, -0.65)])
        return np.minimum(head, _box(u + 0.4, v, 0.6, 0.18))
    if name == "heart":
        lobes = np.minimum(np.hypot(u - 0.38, v - 0.3), np.hypot(u + 0.38, v - 0.3)) - 0.48
        tip = _polygon(u, v, [(0.0, -0.95), (0.83, 0.15), (-0.83, 0.15)])
        return np.minimum(lobes, tip)
    if name == "tee":
        return np.minimum(_box(u, v - 0.65, 0.9, 0.22), _box(u, v + 0.15, 0.22, 0.8))
    return _polygon(u, v, [(1.0, 0.0), (0.0, 0.5), (-1.0, 0.0), (0.0, -0.5)])  # lozenge


# -- one image ---------------------------------------------------------------------------

def render_image(world: World, index: int, size: int = 128) -> np.ndarray:
    """The image of project `index` as (size, size, 3) uint8."""
    return render_attributes(world.config.seed, index, size,
                             **style_attributes(world.styles, int(world.style[index])),
                             category=int(world.category[index]))


def style_attributes(styles: StyleTable, style: int) -> dict:
    colours = None if styles.colours is None else styles.colours[styles.palette[style]]
    scale = 1.0 if styles.scale is None else float(styles.scale[style])
    return {"palette": colours, "texture": int(styles.texture[style]),
            "stroke": int(styles.stroke[style]),
            "composition": int(styles.composition[style]), "texture_scale": scale}


def render_attributes(seed: int, index: int, size: int, *, palette: np.ndarray | None,
                      texture: int, stroke: int, composition: int, category: int,
                      texture_scale: float = 1.0) -> np.ndarray:
    """`palette` None: the project's colours are drawn at random, independent of style."""
    rng = np.random.default_rng([seed, 2, index])
    scale = size / 128
    if palette is None:
        palette = random_palette(np.random.default_rng([seed, 3, index]))
    colours = _jitter_colours(rng, palette)  # background 1, background 2, foreground, ink
    period = BASE_PERIOD[texture] * texture_scale * scale * rng.uniform(0.85, 1.15)
    pattern = _texture(texture, rng, size, period, STROKE_DUTY[stroke])
    mix = _composition(composition, rng, size)
    distance = _placed_shape(rng, category, size)
    inside = np.clip(0.5 - distance, 0, 1)
    line = np.clip(STROKE_PX[stroke] * scale / 2 + 0.5 - np.abs(distance), 0, 1)
    faint = np.float32(0.3) * pattern   # texture behind the shape, in ink
    strong = np.float32(0.75) * pattern  # texture inside the shape, in background colour
    # Per-pixel weights of the four colours: the layers (background, faint texture, shape
    # fill, outline) blended as scalars, so colour arithmetic happens once, at the end.
    behind = (1 - faint) * (1 - inside)
    weights = np.stack([behind * (1 - mix) + inside * strong, behind * mix,
                        inside * (1 - strong), (1 - inside) * faint], axis=-1)
    weights *= (1 - line)[..., None]
    weights[..., 3] += line
    image = weights @ colours
    image += _noise(rng, image.shape)
    np.clip(image, 0, 1, out=image)
    return (image * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    # Drawing 50k normals per image costs as much as the rest of the drawing; a random
    # window into one fixed bank is as good for noise and deterministic too.
    return np.random.default_rng(12345).standard_normal(1 << 20, dtype=np.float32) * NOISE


def _noise(rng, shape) -> np.ndarray:
    n = int(np.prod(shape))
    start = int(rng.integers(0, len(_noise_bank()) - n))
    return _noise_bank()[start:start + n].reshape(shape)


def _jitter_colours(rng, palette: np.ndarray) -> np.ndarray:
    # The same jitter for all four colours keeps the palette's internal contrast.
    gain = rng.normal(1.0, 0.06, 3) * rng.normal(1.0, 0.08)
    shift = rng.normal(0.0, 0.03, 3)
    return np.clip(palette * gain + shift, 0, 1).astype(np.float32)


def _placed_shape(rng, category: int, size: int) -> np.ndarray:
    """Signed distance in pixels to the shape at a random position, scale and rotation."""
    x, y = _grid(size)
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    u, v = _rotate(x - np.float32(cx), y - np.float32(cy), rng.uniform(0, 2 * np.pi))
    # Image rows grow downwards; flip v so shapes are defined with y up.
    return _shape(category, u / np.float32(radius), -v / np.float32(radius)) * np.float32(radius)


# -- files --------------------------------------------------------------------------------

def image_file(images_dir: Path, project_id: int, fmt: str) -> Path:
    """Sub-folders of 1,000 keep directory listings short at 400k images."""
    suffix = "jpg" if fmt == "jpeg" else "png"
    return images_dir / f"{project_id // 1000:04d}" / f"{project_id}.{suffix}"


def save_image(pixels: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if fmt == "jpeg":
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG", compress_level=1)  # speed over a few KB


def _render_batch(args) -> int:
    seed, styles, indices, style, category, images_dir, size, fmt = args
    for index, s, c in zip(indices.tolist(), style.tolist(), category.tolist(), strict=True):
        pixels = render_attributes(seed, index, size, **style_attributes(styles, s),
                                   category=c)
        save_image(pixels, image_file(images_dir, index + 1, fmt), fmt)
    return len(indices)


def render_all(world: World, images_dir: Path, *, size: int = 128, fmt: str = "png",
               processes: int | None = None, indices=None, progress=None) -> int:
    """Render projects' images to files in parallel; returns how many were written."""
    indices = np.arange(world.config.projects) if indices is None else np.asarray(indices)
    processes = processes or os.cpu_count() or 1
    # Each job carries only its own projects' attributes, not the whole world.
    jobs = [(world.config.seed, world.styles, batch, world.style[batch],
             world.category[batch], images_dir, size, fmt)
            for batch in np.array_split(indices, max(1, -(-len(indices) // 256)))]
    total = 0
    if processes == 1:
        results = map(_render_batch, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(processes)
        results = pool.map(_render_batch, jobs)
    try:
        for count in results:
            total += count
            if progress:
                progress(count)
    finally:
        if pool:
            pool.shutdown()
    return total
