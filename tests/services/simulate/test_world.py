import numpy as np

from services.simulate.world import CATEGORIES, build_world, preset, style_table


def test_same_seed_same_world_other_seed_other_world():
    a, b = build_world(preset("tiny")), build_world(preset("tiny"))
    c = build_world(preset("tiny", seed=1))
    for name in ("style", "category", "owner", "popularity", "publish_ms", "style_pref"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.style, c.style)


def test_styles_share_palettes_and_textures():
    table = style_table(24)
    combos = set(zip(table.palette, table.texture, table.stroke, table.composition,
                     strict=True))
    assert len(combos) == 24  # every style is a distinct combination
    # Every palette carries three styles and every texture recurs under three palettes,
    # so neither colour nor texture alone names the style.
    assert np.bincount(table.palette).tolist() == [3] * 8
    assert np.bincount(table.texture).tolist() == [3] * 8
    assert len(set(zip(table.palette, table.texture, strict=True))) == 24
    # Some same-palette pairs differ only in texture.
    same = [(a, b) for a in range(24) for b in range(a + 1, 24)
            if table.palette[a] == table.palette[b] and table.stroke[a] == table.stroke[b]
            and table.composition[a] == table.composition[b]]
    assert len(same) >= 8


def test_attribute_distributions(tiny_world):
    world = build_world(preset("small", events=0))
    assert world.config.n_styles >= 16 and world.config.n_categories >= 10
    assert len(CATEGORIES) >= world.config.n_categories
    assert set(np.unique(world.style)) == set(range(world.config.n_styles))
    counts = np.bincount(world.category, minlength=world.config.n_categories)
    assert counts.min() > 0.7 * counts.mean()  # categories uniform
    # Tastes: 1-3 preferred styles, 1-2 preferred categories, strengths in (0, 1].
    liked = (world.style_pref > 0).sum(1)
    assert liked.min() >= 1 and liked.max() <= 3
    assert (world.category_pref > 0).sum(1).min() >= 1
    # Heavy tails: the top 1% of users and projects hold far more than 1%.
    for weights in (world.activity, world.popularity):
        top = np.sort(weights)[-len(weights) // 100:].sum() / weights.sum()
        assert top > 0.08
        assert np.percentile(weights, 99) > 10 * np.median(weights)
    assert world.owner.min() >= 0 and world.owner.max() < world.config.users
    assert np.all(np.diff(world.publish_ms) >= 0)
    deleted = world.delete_ms >= 0
    assert 0 < deleted.mean() < 0.05
    assert np.all(world.delete_ms[deleted] > world.publish_ms[deleted])


def test_owners_mostly_work_in_styles_they_like(tiny_world):
    liked = tiny_world.style_pref[tiny_world.owner, tiny_world.style] > 0
    assert liked.mean() > 0.5
