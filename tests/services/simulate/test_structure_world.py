"""The structure world: colour carries no style, structure does, content is still shape."""

import numpy as np
import pytest
import torch
from torch import nn

from services.simulate import stats
from services.simulate.render import render_image
from services.simulate.world import (
    N_TEXTURES,
    SCALES,
    build_world,
    preset,
    structure_table,
)


@pytest.fixture(scope="module")
def world():
    return build_world(preset("small", events=0, projects=600))


def test_small_is_the_structure_world_and_palette_stays_selectable():
    assert preset("small").world == "structure"
    assert preset("small", world="palette").world == "palette"
    assert preset("tiny").world == "palette"
    with pytest.raises(ValueError, match="unknown world"):
        preset("tiny", world="neon")


def test_styles_are_structure_only():
    table = structure_table(24)
    assert table.colours is None and table.n_palettes == 0
    combos = set(zip(table.texture, table.scale, table.stroke, table.composition,
                     strict=True))
    assert len(combos) == 24
    # Neither the texture family nor its scale alone names the style.
    assert np.bincount(table.texture).tolist() == [3] * N_TEXTURES
    assert sorted(np.unique(table.scale).tolist()) == sorted(np.float32(SCALES).tolist())
    assert min(np.unique(table.scale, return_counts=True)[1]) == 8


def test_colours_are_drawn_per_project(world):
    same_style = np.flatnonzero(world.style == world.style[0])[:6]
    means = np.stack([render_image(world, j, 32).reshape(-1, 3).mean(0) for j in same_style])
    assert means.std(0).mean() > 15  # grey levels: same style, different colours
    assert np.array_equal(render_image(world, 3, 32), render_image(world, 3, 32))


def test_colour_says_nothing_of_style_structure_does(world):
    result = stats.colour_baseline(world, n=480, size=64)
    style = result["style"]
    assert style["accuracy"] < 2 * style["chance"]
    assert "palette" not in result
    structure = result["style from structure"]
    assert structure["accuracy"] > 5 * structure["chance"]


def test_fine_texture_is_partly_lost_in_thumbnails(world):
    pixels = {size: [render_image(world, j, size) for j in range(480)] for size in (32, 128)}
    accuracy = {}
    for size, images in pixels.items():
        features = np.stack([stats.structure_features(p) for p in images])
        accuracy[size] = stats.nearest_centroid(features[:240], world.style[:240],
                                                features[240:], world.style[240:480])
    assert accuracy[128] > accuracy[32] + 0.05


def test_content_is_learnable_from_pixels():
    """A three-layer CNN trained for seconds on 800 thumbnails names the shape clearly
    above chance (0.155 against 0.083 here, 200 test images: ~3.5 standard errors); the
    evaluation's CNNs, on thousands of images, do much better."""
    torch.manual_seed(0)
    size, n_train, n = 32, 800, 1000
    world = build_world(preset("small", events=0, projects=n))
    images = np.stack([render_image(world, j, size) for j in range(n)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
    y = torch.from_numpy(world.category[:n].astype(np.int64))
    net = _small_cnn(world.config.n_categories)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        net.train()
        for batch in torch.randperm(n_train).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (net.eval()(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()
    assert accuracy > 1.5 / world.config.n_categories


def _small_cnn(classes: int) -> nn.Module:
    layers, channels = [], 3
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, classes))
