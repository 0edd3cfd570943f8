"""The hidden world: styles, content categories, users with tastes, projects with owners.

Everything here is ground truth that the pipeline must never see; only images and events
leave the simulator (see shared/groundtruth.py for the evaluation-only copy).
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass, replace

import numpy as np

N_TEXTURES = 8
N_COMPOSITIONS = 4
STYLES_PER_PALETTE = 3
# Texture period multipliers of the structure world: the finest is about 2.5 px at 64 px
# and is mostly lost at 32 px, the coarsest survives any thumbnail.
SCALES = (0.55, 1.0, 1.7)
WORLDS = ("palette", "structure")
CATEGORIES = ("disk", "square", "triangle", "star", "plus", "ring", "crescent", "hexagon",
              "arrow", "heart", "tee", "lozenge")
DAY_MS = 86_400_000
START_MS = 1_735_689_600_000  # 2025-01-01T00:00Z: simulated time starts here


@dataclass(frozen=True)
class WorldConfig:
    users: int
    projects: int
    events: int
    seed: int = 0
    n_styles: int = 24
    n_categories: int = len(CATEGORIES)
    days: int = 180
    chunks: int = 60
    # Share of projects already on the platform when simulated time starts.
    initial_fraction: float = 0.3
    update_fraction: float = 0.02
    delete_fraction: float = 0.01
    # "palette": each style owns a colour scheme (colour statistics give the style away);
    # "structure": colours are drawn per project, style is texture, scale, stroke, layout.
    world: str = "palette"

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; choose from {', '.join(WORLDS)}")


PRESETS = {
    "tiny": WorldConfig(users=200, projects=500, events=20_000, chunks=20),
    "small": WorldConfig(users=5_000, projects=10_000, events=1_000_000, world="structure"),
    # A tenth of filtered Behance: ~3.1M appreciations + 17.8M views over a year.
    "medium": WorldConfig(users=30_900, projects=42_300, events=21_200_000, days=365,
                          chunks=365),
    # Behance after the paper's filtering: 31M appreciations + 178M views (+ comments).
    "behance": WorldConfig(users=309_000, projects=423_000, events=212_000_000, days=365,
                           chunks=730),
}


def preset(name: str, **overrides) -> WorldConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class StyleTable:
    """Each style is a (palette, texture, stroke, composition) combination.

    Three styles share every palette and differ in texture, so a colour histogram alone
    can tell the palette but not the style; every texture recurs under three palettes, so
    texture alone does not tell it either.
    """

    palette: np.ndarray  # -1 everywhere when colours are drawn per project
    texture: np.ndarray
    stroke: np.ndarray
    composition: np.ndarray
    colours: np.ndarray | None  # (n_palettes, 4, 3) float32: background 1/2, foreground 1/2
    scale: np.ndarray | None = None  # texture period multiplier (structure world)

    @property
    def n_palettes(self) -> int:
        return 0 if self.colours is None else len(self.colours)


def style_table(n_styles: int, world: str = "palette") -> StyleTable:
    if world == "structure":
        return structure_table(n_styles)
    index = np.arange(n_styles)
    palette, k = np.divmod(index, STYLES_PER_PALETTE)
    n_palettes = int(palette.max()) + 1
    return StyleTable(
        palette=palette,
        # p + 3k visits every texture exactly three times for 8 palettes.
        texture=(palette + 3 * k) % N_TEXTURES,
        stroke=(palette + k) % 2,
        composition=(palette + 2 * k) % N_COMPOSITIONS,
        colours=_palettes(n_palettes),
    )


def structure_table(n_styles: int) -> StyleTable:
    """Styles without colours: every (texture, scale) pair is its own style for 24 styles,
    so neither the texture family nor its scale alone tells the style; stroke weight and
    background layout vary across styles as further, coarser cues."""
    index = np.arange(n_styles)
    level, texture = np.divmod(index, N_TEXTURES)
    return StyleTable(
        palette=np.full(n_styles, -1), texture=texture % N_TEXTURES,
        stroke=(texture + level) % 2, composition=(texture + 3 * level) % N_COMPOSITIONS,
        colours=None, scale=np.asarray(SCALES, dtype=np.float32)[level % len(SCALES)])


def random_palette(rng) -> np.ndarray:
    """One project's four colours (background 1/2, fill, ink), each of its own random hue,
    saturation and value: how much of each colour an image shows depends on its style, so
    a fixed scheme per role would still let colour spread hint at the texture."""
    def colour(s_range, v_range):
        return colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s_range), rng.uniform(*v_range))

    light, dark = (0.05, 0.6), (0.3, 1.0)
    colours = [colour(light, (0.55, 0.95)), colour(light, (0.45, 0.9)),
               colour(dark, (0.35, 0.9)), colour(dark, (0.05, 0.5))]
    if rng.random() < 0.5:  # dark backgrounds with light ink as often as the reverse
        colours = [colours[3], colours[2], colours[1], colours[0]]
    return np.array(colours, dtype=np.float32)


def _palettes(n: int) -> np.ndarray:
    """Evenly spaced hues; neighbours overlap once per-image colour jitter is added."""
    def colour(h, s, v):
        return colorsys.hsv_to_rgb(h % 1.0, s, v)

    hues = [(p / n + 0.07) % 1.0 for p in range(n)]
    return np.array([[colour(h, 0.25, 0.92),          # light background
                      colour(h + 0.05, 0.45, 0.70),   # darker background
                      colour(h + 0.5, 0.75, 0.80),    # complementary foreground
                      colour(h + 0.10, 0.85, 0.35)]   # deep foreground / ink
                     for h in hues], dtype=np.float32)


@dataclass
class World:
    config: WorldConfig
    styles: StyleTable
    # users (index u; id = u + 1)
    activity: np.ndarray       # float64, sums to 1: share of views a user makes
    user_bias: np.ndarray      # float32: some users appreciate more readily
    style_pref: np.ndarray     # (U, S) float32 in [0, 1]: mostly zero
    category_pref: np.ndarray  # (U, C) float32 in [0, 1]
    # projects (index j, in publication order; id = j + 1)
    style: np.ndarray          # int16
    category: np.ndarray       # int16
    owner: np.ndarray          # int64 user index
    popularity: np.ndarray     # float64, heavy-tailed exposure weight
    quality: np.ndarray        # float32: appeal that is not visible in the image
    publish_ms: np.ndarray     # int64, sorted
    update_ms: np.ndarray      # int64, -1 when never updated
    delete_ms: np.ndarray      # int64, -1 when never deleted

    @property
    def user_ids(self) -> np.ndarray:
        return np.arange(1, self.config.users + 1, dtype=np.int64)

    @property
    def project_ids(self) -> np.ndarray:
        return np.arange(1, self.config.projects + 1, dtype=np.int64)

    @property
    def start_ms(self) -> int:
        return START_MS

    @property
    def end_ms(self) -> int:
        return START_MS + self.config.days * DAY_MS


def build_world(config: WorldConfig) -> World:
    rng = np.random.default_rng([config.seed, 1])
    styles = style_table(config.n_styles, config.world)
    style_pref = _sparse_preferences(rng, config.users, config.n_styles, (1, 2, 3),
                                     (0.4, 0.4, 0.2), low=0.6)
    category_pref = _sparse_preferences(rng, config.users, config.n_categories, (1, 2),
                                        (0.6, 0.4), low=0.5)
    owner = _owners(rng, config)
    publish_ms = _publish_times(rng, config)
    update_ms, delete_ms = _later_times(rng, publish_ms, config)
    return World(
        config=config, styles=styles,
        activity=_normalized(rng.lognormal(0.0, 1.4, config.users)),
        user_bias=rng.normal(0.0, 0.5, config.users).astype(np.float32),
        style_pref=style_pref, category_pref=category_pref,
        style=_project_styles(rng, owner, style_pref),
        category=rng.integers(0, config.n_categories, config.projects).astype(np.int16),
        owner=owner,
        popularity=rng.lognormal(0.0, 1.5, config.projects),
        quality=rng.normal(0.0, 1.0, config.projects).astype(np.float32),
        publish_ms=publish_ms, update_ms=update_ms, delete_ms=delete_ms,
    )


def _normalized(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _sparse_preferences(rng, n: int, width: int, counts, probs, low: float) -> np.ndarray:
    """Each row likes a few random columns, each with strength in [low, 1]."""
    k = rng.choice(counts, size=n, p=probs)
    # A random permutation per row picks distinct columns without a Python loop.
    order = np.argsort(rng.random((n, width)), axis=1)
    chosen = np.arange(width)[None, :] < k[:, None]
    prefs = np.zeros((n, width), dtype=np.float32)
    rows = np.repeat(np.arange(n), width).reshape(n, width)
    strength = rng.uniform(low, 1.0, (n, width)).astype(np.float32)
    prefs[rows[chosen], order[chosen]] = strength[chosen]
    return prefs


def _owners(rng, config: WorldConfig) -> np.ndarray:
    # A few prolific creators publish much of the catalogue.
    weights = _normalized(rng.lognormal(0.0, 1.5, config.users))
    return rng.choice(config.users, size=config.projects, p=weights).astype(np.int64)


def _project_styles(rng, owner: np.ndarray, style_pref: np.ndarray) -> np.ndarray:
    """Creators mostly work in a style they like themselves; the rest is uniform."""
    n, n_styles = len(owner), style_pref.shape[1]
    cumulative = np.cumsum(style_pref[owner], axis=1)
    draw = rng.random(n) * cumulative[:, -1]
    own_style = (cumulative < draw[:, None]).sum(axis=1)
    uniform = rng.integers(0, n_styles, n)
    return np.where(rng.random(n) < 0.6, own_style, uniform).astype(np.int16)


def _publish_times(rng, config: WorldConfig) -> np.ndarray:
    span = config.days * DAY_MS
    initial = rng.random(config.projects) < config.initial_fraction
    # The initial catalogue appeared over the 30 days before simulated time starts.
    offsets = np.where(initial, -rng.integers(1, 30 * DAY_MS, config.projects),
                       rng.integers(0, span, config.projects))
    return np.sort(START_MS + offsets).astype(np.int64)


def _later_times(rng, publish_ms: np.ndarray, config: WorldConfig):
    end = START_MS + config.days * DAY_MS
    n = len(publish_ms)

    def pick(fraction: float) -> np.ndarray:
        at = publish_ms + (rng.random(n) * (end - np.maximum(publish_ms, START_MS))).astype(
            np.int64)
        at = np.maximum(at, publish_ms + 1)
        return np.where(rng.random(n) < fraction, at, -1).astype(np.int64)

    update_ms, delete_ms = pick(config.update_fraction), pick(config.delete_fraction)
    # A deleted project is not updated afterwards.
    update_ms[(delete_ms >= 0) & (update_ms >= delete_ms)] = -1
    return update_ms, delete_ms


def describe(world: World) -> dict:
    """The world's sizes and parameters: safe to print and to store beside the truth."""
    return asdict(world.config) | {"n_palettes": world.styles.n_palettes,
                                   "colour_per": "style" if world.styles.n_palettes
                                   else "project",
                                   "n_textures": N_TEXTURES, "categories": list(CATEGORIES)}


def ground_truth(world: World):
    """The evaluation-only copy of the hidden attributes (see shared/groundtruth.py)."""
    from shared.groundtruth import GroundTruth

    styles = world.styles
    return GroundTruth(
        project_ids=world.project_ids, project_style=world.style,
        project_category=world.category,
        project_palette=styles.palette[world.style].astype(np.int16),
        project_texture=styles.texture[world.style].astype(np.int16),
        user_ids=world.user_ids, user_style_pref=world.style_pref,
        user_category_pref=world.category_pref, meta=describe(world))
