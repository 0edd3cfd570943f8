import numpy as np
from PIL import Image

from services.simulate import stats
from services.simulate.render import image_file, render_all, render_attributes, render_image
from services.simulate.world import build_world, preset


def test_deterministic_and_seeded(tiny_world):
    a = render_image(tiny_world, 7)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_image(tiny_world, 7))
    other = build_world(preset("tiny", seed=5))
    assert not np.array_equal(a, render_image(other, 7))
    assert render_image(tiny_world, 7, size=64).shape == (64, 64, 3)


def test_files_decode_and_match(tmp_path, tiny_world):
    written = render_all(tiny_world, tmp_path, size=96, fmt="png", processes=2,
                         indices=range(20))
    assert written == 20
    for index in (0, 19):
        with Image.open(image_file(tmp_path, index + 1, "png")) as image:
            assert image.mode == "RGB" and image.size == (96, 96)
            assert np.array_equal(np.asarray(image), render_image(tiny_world, index, 96))
    render_all(tiny_world, tmp_path, fmt="jpeg", processes=1, indices=[3])
    with Image.open(image_file(tmp_path, 4, "jpeg")) as image:
        assert image.format == "JPEG"
        error = np.abs(np.asarray(image, dtype=int) - render_image(tiny_world, 3)).mean()
        assert error < 12


def test_style_and_category_both_change_pixels(tiny_world):
    styles = tiny_world.styles
    base = dict(palette=styles.colours[0], texture=0, stroke=0, composition=0, category=0)
    image = render_attributes(0, 1, 128, **base)

    def changed(**change) -> float:
        other = render_attributes(0, 1, 128, **(base | change))
        return float((np.abs(other.astype(int) - image).sum(-1) > 60).mean())

    # Same random draws otherwise: only the changed attribute moves pixels.
    assert changed(category=3) > 0.03          # the shape
    assert changed(texture=3) > 0.2            # the fine pattern, everywhere
    assert changed(palette=styles.colours[4]) > 0.5
    assert changed() == 0.0


def test_colour_statistics_tell_palette_not_style():
    world = build_world(preset("small", events=0, world="palette"))
    result = stats.colour_baseline(world, n=480, size=64)
    style, palette = result["style"], result["palette"]
    assert style["accuracy"] > 4 * style["chance"]   # style is visible in pixels...
    assert style["accuracy"] < 0.8                    # ...but colour alone does not solve it
    assert palette["accuracy"] > style["accuracy"] + 0.2
    assert result["category"]["accuracy"] < 0.3       # content needs shape, not colour
