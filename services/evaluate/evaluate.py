"""The paper's comparison on our world (docs/evaluation.md): features from several sources,
scored on projects the CNN never trained on, against the simulator's hidden labels.

Plain functions; `run` strings them together. Only the evaluator and the simulator may read
the ground truth (tests/services/simulate/test_truth_isolation.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.evaluate import warmup
from services.evaluate.features import handcrafted_features
from services.evaluate.metrics import linear_probe, map_at_k, recall_at_k, user_profiles
from shared import groundtruth
from shared.cnn import current_cnn_version, model_path
from shared.factors import Factors, current_factor_version, factor_version, load_factors
from shared.images import ImageError, ImageReader, Policy
from shared.training.data import Augment, holdout_mask
from shared.training.targets import make_targets, normalize_rows
from shared.training.train import EpochHook, Split, TrainConfig, train
from shared.vision import MEAN, STD, CofeatNet, ModelConfig, build_model, load_model, resize_crop

log = logging.getLogger(__name__)

REGRESS, PSEUDO = "collaborative-regress", "collaborative-pseudo-class"
CATEGORY, RANDOM = "category-supervised", "random-init"
HANDCRAFTED, FACTORS, POPULARITY = "handcrafted", "latent-factors", "popularity"
IMAGENET = "imagenet"  # frozen ImageNet MobileNetV2, the paper's middle column
REGRESS_IN, CATEGORY_IN = "collaborative (ImageNet init)", "category-supervised (ImageNet init)"
# The twins fine-tuned from ImageNet: mobilenet_v2, same images, size and targets.
IMAGENET_INIT = {REGRESS_IN: REGRESS, CATEGORY_IN: CATEGORY}
IMAGENET_BACKBONE = "mobilenet_v2"
CNN_SOURCES = (REGRESS, PSEUDO, CATEGORY, RANDOM, *IMAGENET_INIT)
FEATURE_SOURCES = (*CNN_SOURCES, IMAGENET, HANDCRAFTED, FACTORS)
MODE_OF = {REGRESS: "regress", PSEUDO: "pseudo-class"}
# Sources whose head predicts an item factor direction (user_recall ranks with it).
HEAD_MODE = {**MODE_OF, REGRESS_IN: "regress"}
STYLE_MAP, STYLE_PROBE, CONTENT_PROBE, USER_RECALL = (
    "style_map@10", "style_probe_acc", "content_probe_acc", "user_recall@20")
TASKS = (STYLE_MAP, STYLE_PROBE, CONTENT_PROBE, USER_RECALL)
# New projects have no factors.
RECALL_SOURCES = (*CNN_SOURCES, IMAGENET, HANDCRAFTED, POPULARITY)
MAP_K, RECALL_K = 10, 20


class EvalError(RuntimeError):
    """Nothing to evaluate (no factor version, no held-out projects); one line."""


@dataclass(frozen=True)
class EvalConfig:
    """Used as is when no live CNN exists; otherwise the live version's params win for the
    architecture, epochs and holdout, so every CNN is trained the same way."""

    epochs: int = 10
    backbone: str = "small"
    image_size: int = 64
    seed: int = 0
    max_projects: int | None = None  # per held-out set, a seeded sample
    val_fraction: float = 0.1
    holdout_salt: int = 0
    pseudo_classes: int = 64
    batch_size: int = 64
    workers: int = 2
    progress: bool = True
    # ImageNet features need ImageNet-sized inputs; CI's tiny path may pass a smaller one.
    imagenet_size: int = 224
    # The ImageNet-initialised twins; fine-tuning needs fewer epochs than training from scratch.
    imagenet_init: bool = True
    imagenet_init_epochs: int = 3


@dataclass
class Plan:
    """How every CNN of the comparison is built and trained."""

    model_config: ModelConfig
    train_config: TrainConfig
    val_fraction: float
    holdout_salt: int
    pseudo_classes: int
    live: dict | None = None  # {"row", "mode", "model", "centroids"} of the live CNN


@dataclass
class Catalog:
    """Live projects with ground truth, in id order."""

    ids: np.ndarray
    paths: list[str]  # image_uris
    style: np.ndarray
    category: np.ndarray
    reader: ImageReader | None = None  # how `paths` are read


@dataclass
class Sets:
    """Catalog rows: the CNNs' training split, held-out projects with factors, new ones."""

    train: np.ndarray
    held_factor: np.ndarray
    new: np.ndarray

    @property
    def held(self) -> np.ndarray:
        return np.concatenate([self.held_factor, self.new])


@dataclass
class Recall:
    """The user_recall@20 protocol on new projects (docs/evaluation.md)."""

    users: np.ndarray  # user ids
    candidates: np.ndarray  # catalog rows of the new projects ranked
    targets: list[np.ndarray]  # per user, candidate positions appreciated after the cut
    exclude: list[np.ndarray]  # per user, candidate positions appreciated before the cut
    history: list[np.ndarray]  # per user, catalog rows appreciated up to the watermark
    popularity: np.ndarray  # per candidate
    cut_seq: int


@dataclass
class Inputs:
    """What every comparison starts from: versions, catalog, recipe and held-out split."""

    truth: groundtruth.GroundTruth
    factor_row: dict
    factors: Factors
    cnn_row: dict | None
    catalog: Catalog
    plan: Plan
    sets: Sets


@dataclass
class Outcome:
    world: dict
    results: list[dict]
    neighbours: dict = field(default_factory=dict)  # what report.plot_neighbours draws


# -- inputs ---------------------------------------------------------------------------


def prepare(conn, data_dir: Path, config: EvalConfig,
            reader: ImageReader | None = None) -> Inputs:
    """Versions, catalog, recipe and split; EvalError when there is nothing to compare.
    `reader` reads the image_uris (default: COFEAT_IMAGE_* for this data_dir)."""
    truth = groundtruth.read(data_dir)
    factor_row, factors, cnn_row = load_versions(conn, data_dir)
    catalog = load_catalog(conn, truth, reader or _reader(data_dir))
    plan = make_plan(data_dir, cnn_row, config)
    sets = split_sets(catalog, factors, plan, config.max_projects, config.seed)
    log.info("projects: %d train, %d held out with factors, %d new", len(sets.train),
             len(sets.held_factor), len(sets.new))
    if len(sets.held) < 2 or not len(sets.train):
        raise EvalError(f"too few projects: {len(sets.train)} to train, {len(sets.held)} "
                        "held out")
    return Inputs(truth, factor_row, factors, cnn_row, catalog, plan, sets)


def load_versions(conn, data_dir: Path) -> tuple[dict, Factors, dict | None]:
    """(factor row, factors, live CNN row or None). With a live CNN, the factor version
    is the one it learned from, so its holdout and its targets agree."""
    cnn_row = current_cnn_version(conn)
    if cnn_row is not None:
        factor_row = factor_version(conn, cnn_row["factor_version_id"])
    else:
        factor_row = current_factor_version(conn)
    if factor_row is None:
        raise EvalError("no promoted factor version: run `cofeat refresh factors` first")
    return factor_row, load_factors(data_dir, factor_row), cnn_row


def _reader(data_dir: Path) -> ImageReader:
    from shared.settings import load_settings

    return ImageReader.from_settings(load_settings(data_dir=data_dir))


def load_catalog(conn, truth: groundtruth.GroundTruth, reader: ImageReader) -> Catalog:
    rows = conn.execute("SELECT project_id, image_uri FROM projects WHERE status = 'live' "
                        "ORDER BY project_id").fetchall()
    conn.commit()
    known = set(truth.project_ids.tolist())
    # As the CNN refresh does: an image_uri the policy refuses is never read.
    rows = [(pid, uri) for pid, uri in rows if pid in known and reader.allowed(uri)]
    ids = np.array([pid for pid, _ in rows], dtype=np.int64)
    return Catalog(ids, [uri for _, uri in rows], truth.style_of(ids).astype(np.int64),
                   truth.category_of(ids).astype(np.int64), reader)


def make_plan(data_dir: Path, cnn_row: dict | None, config: EvalConfig) -> Plan:
    """The live CNN's recorded params, or the config's when there is none."""
    augment = Augment()
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                               seed=config.seed, augment=augment, num_workers=config.workers)
    if cnn_row is None:
        model_config = ModelConfig(backbone=config.backbone, image_size=config.image_size,
                                   feature="penultimate")
        return Plan(model_config, train_config, config.val_fraction, config.holdout_salt,
                    config.pseudo_classes)
    model, extra = load_model(model_path(data_dir, cnn_row), "cpu")
    meta = _read_meta(data_dir, cnn_row)
    params = {**cnn_row.get("params", {}), **meta.get("params", {})}
    recorded = extra.get("train_config", {})
    known = {f.name for f in fields(TrainConfig)} - {"augment", "num_workers", "mode",
                                                     "epochs"}
    train_config = replace(train_config, **{k: v for k, v in recorded.items() if k in known})
    if params.get("epochs") and params.get("refresh", "full") == "full":
        train_config = replace(train_config, epochs=int(params["epochs"]))
    else:  # a fine-tune records its few extra epochs, not what a model from scratch needs
        log.warning("live CNN records no full-training epochs: training the others for "
                    "--epochs %d", config.epochs)
    mode = params.get("mode") or extra.get("mode") or "regress"
    centroids = meta.get("centroids")
    live = {"row": cnn_row, "mode": mode, "model": model,
            "centroids": np.asarray(centroids, dtype=np.float32) if centroids else None}
    return Plan(replace(model.config, feature="penultimate"), train_config,
                float(params.get("val_fraction", config.val_fraction)),
                int(params.get("holdout_salt", config.holdout_salt)),
                int(params.get("pseudo_classes") or config.pseudo_classes), live)


def _read_meta(data_dir: Path, row: dict) -> dict:
    from shared.artifacts import read_json

    return read_json(Path(data_dir) / row["artifact"] / "meta.json")


def split_sets(catalog: Catalog, factors: Factors, plan: Plan, max_projects: int | None,
               seed: int) -> Sets:
    """Training split as the CNN refresh makes it (usable factor, not in the id-hash
    holdout); held-out = holdout projects with factors + live projects without factors."""
    rows = factors.item_rows(catalog.ids)
    has = rows >= 0
    _, usable = normalize_rows(factors.item_factors[np.maximum(rows, 0)])
    usable &= has
    held = holdout_mask(catalog.ids, plan.val_fraction, plan.holdout_salt)
    rng = np.random.default_rng(seed)
    return Sets(np.flatnonzero(usable & ~held),
                _sample(np.flatnonzero(usable & held), max_projects, rng),
                _sample(np.flatnonzero(~has), max_projects, rng))


def _sample(rows: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(rng.choice(rows, limit, replace=False))


# -- models ---------------------------------------------------------------------------


def build_models(catalog: Catalog, factors: Factors, sets: Sets, plan: Plan,
                 work_dir: Path, seed: int, progress: bool,
                 seconds: dict | None = None) -> tuple[dict, np.ndarray | None]:
    """{source: model} for the four CNN sources, and the pseudo-class centroids.
    `seconds` collects each source's training time."""
    seconds = {} if seconds is None else seconds
    item_factors = factors.item_factors[factors.item_rows(catalog.ids[sets.train])]
    paths = [catalog.paths[i] for i in sets.train]
    models, centroids = {}, None
    live_mode = plan.live["mode"] if plan.live else None
    for source, mode in MODE_OF.items():
        if mode == live_mode:
            log.info("%s: the live CNN version %d", source, plan.live["row"]["id"])
            models[source] = plan.live["model"]
            continue
        started = time.monotonic()
        targets = make_targets(item_factors, mode, k=plan.pseudo_classes, seed=seed)
        models[source] = train_source(source, paths, targets.values, targets.out_dim, mode,
                                      plan, work_dir, progress, reader=catalog.reader)
        seconds[source] = time.monotonic() - started
        if mode == "pseudo-class":
            centroids = targets.centroids
    if live_mode == "pseudo-class":
        centroids = plan.live["centroids"]
    categories = catalog.category[sets.train]
    started = time.monotonic()
    models[CATEGORY] = train_source(CATEGORY, paths, categories,
                                    int(catalog.category.max()) + 1, "pseudo-class", plan,
                                    work_dir, progress, reader=catalog.reader)
    seconds[CATEGORY] = time.monotonic() - started
    models[RANDOM] = random_init(plan, factors.item_factors.shape[1], seed)
    return models, centroids


def build_imagenet_init(catalog: Catalog, factors: Factors, sets: Sets, plan: Plan,
                        work_dir: Path, config: EvalConfig,
                        seconds: dict) -> dict[str, CofeatNet]:
    """The collaborative (regress) and category-supervised CNNs again, as production would
    train them: mobilenet_v2 fine-tuned from the packaged ImageNet weights."""
    from shared import imagenet

    weights = imagenet.weights_path()
    twin = replace(plan, model_config=replace(plan.model_config, backbone=IMAGENET_BACKBONE),
                   train_config=replace(plan.train_config, epochs=config.imagenet_init_epochs))
    paths = [catalog.paths[i] for i in sets.train]
    item_factors = factors.item_factors[factors.item_rows(catalog.ids[sets.train])]
    regress = make_targets(item_factors, "regress", seed=config.seed)
    jobs = {REGRESS_IN: (regress.values, regress.out_dim, "regress"),
            CATEGORY_IN: (catalog.category[sets.train], int(catalog.category.max()) + 1,
                          "pseudo-class")}
    models = {}
    for source, (targets, out_dim, mode) in jobs.items():
        started = time.monotonic()
        start = imagenet.start_model(replace(twin.model_config, out_dim=out_dim), weights,
                                     work_dir / source / "imagenet.pt")
        models[source] = train_source(source, paths, targets, out_dim, mode, twin, work_dir,
                                      config.progress, reader=catalog.reader, init_from=start)
        seconds[source] = time.monotonic() - started
    return models


def train_source(source: str, paths: list[str], targets: np.ndarray, out_dim: int, mode: str,
                 plan: Plan, work_dir: Path, progress: bool,
                 on_epoch: EpochHook | None = None,
                 reader: ImageReader | None = None,
                 init_from: Path | None = None) -> CofeatNet:
    log.info("training %s on %d projects, %d epochs", source, len(paths),
             plan.train_config.epochs)
    model_config = replace(plan.model_config, out_dim=out_dim)
    config = replace(plan.train_config, mode=mode)
    # Its own folder per source: train() resumes from checkpoints there after a crash.
    result = train(model_config, Split(paths, targets, reader=reader), None, config,
                   work_dir / source, init_from=init_from,
                   on_epoch=on_epoch, progress=progress, device=torch.device("cpu"))
    return result.model.eval()


def random_init(plan: Plan, out_dim: int, seed: int) -> CofeatNet:
    """The shared architecture with seeded random weights, BatchNorm at its initial
    statistics: the baseline any training has to beat."""
    torch.manual_seed(seed)
    return build_model(replace(plan.model_config, out_dim=out_dim)).eval()


# -- features -------------------------------------------------------------------------


def read_images(catalog: Catalog, rows: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 N x S x S x 3: the serving view (centre square, resized), decoded once and
    shared by every source; fetched concurrently."""
    from tqdm import tqdm

    reader = catalog.reader or ImageReader(Policy.local_files())
    out = np.zeros((len(rows), image_size, image_size, 3), dtype=np.uint8)
    fetched = reader.fetch_many(catalog.paths[row] for row in rows)
    bar = tqdm(zip(rows, fetched, strict=True), total=len(rows), desc="images", unit="img",
               disable=None)
    for n, (row, data) in enumerate(bar):
        try:
            if isinstance(data, ImageError):
                raise data
            out[n] = np.asarray(resize_crop(reader.decode(data, image_size), image_size))
        except ImageError as error:  # a black tile: one bad image must not stop the run
            log.warning("unreadable image %s: %s", catalog.paths[row], error.reason)
    return out


@torch.inference_mode()
def cnn_outputs(model: CofeatNet, pixels: np.ndarray,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, raw head outputs), unnormalized, for a uint8 batch."""
    model = model.cpu().eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    penultimate, head = [], []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(pixels[start:start + batch_size]).permute(0, 3, 1, 2)
        batch = (batch.float() / 255 - mean) / std
        if model.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = model.backbone(batch)
        penultimate.append(features)
        head.append(model.head(features))
    return torch.cat(penultimate).numpy(), torch.cat(head).numpy()


def l2(x: np.ndarray) -> np.ndarray:
    return F.normalize(torch.as_tensor(np.asarray(x, dtype=np.float32)), dim=1).numpy()


def factor_space(source: str, head: np.ndarray, centroids: np.ndarray | None) -> np.ndarray:
    """A collaborative CNN's prediction of an item factor direction: the normalized
    regression output, or the softmax-weighted mean of the K-means centroids."""
    if HEAD_MODE[source] == "regress":
        return l2(head)
    probs = torch.softmax(torch.as_tensor(head), dim=1).numpy()
    return probs @ centroids


# -- tasks ----------------------------------------------------------------------------


def image_tasks(features: np.ndarray, style: np.ndarray, category: np.ndarray,
                seed: int) -> dict[str, float]:
    x = l2(features)
    return {STYLE_MAP: map_at_k(x, style, MAP_K),
            STYLE_PROBE: linear_probe(x, style, seed=seed),
            CONTENT_PROBE: linear_probe(x, category, seed=seed)}


def style_map(model: CofeatNet, pixels: np.ndarray, style: np.ndarray) -> float:
    """style_map@10 of a CNN's penultimate features, as in the table."""
    return map_at_k(l2(cnn_outputs(model, pixels)[0]), style, MAP_K)


def recall_protocol(conn, catalog: Catalog, factors: Factors, factor_row: dict,
                    new_rows: np.ndarray) -> Recall | None:
    """Users with factors who appreciate new projects: rank the new projects for them.

    The new projects' appreciations (by anyone) are cut at their median seq: before it is
    "so far" (popularity, already seen), after it is what to predict. History for profiles
    is what users appreciated up to the factor version's watermark.
    """
    pairs = np.array(conn.execute(
        "SELECT user_id, project_id, seq FROM interactions WHERE type = 1 ORDER BY seq"
    ).fetchall(), dtype=np.int64).reshape(-1, 3)
    conn.commit()
    user, project, seq = pairs.T
    candidates = catalog.ids[new_rows]
    position = _positions(candidates, project)
    on_new = position >= 0
    if not on_new.any():
        return None
    cut = int(np.median(seq[on_new]))
    so_far = on_new & (seq <= cut)
    with_factors = factors.user_rows(user) >= 0
    before, after = so_far & with_factors, on_new & (seq > cut) & with_factors
    watermark = factor_row.get("watermark") or int(seq.max())
    catalog_pos = _positions(catalog.ids, project)
    old = (seq <= watermark) & (factors.item_rows(project) >= 0) & (catalog_pos >= 0)
    users = np.intersect1d(np.unique(user[after]), np.unique(user[old]))
    targets = _grouped(users, user[after], position[after])
    exclude = _grouped(users, user[before], position[before])
    targets = [np.setdiff1d(t, e) for t, e in zip(targets, exclude, strict=True)]
    keep = np.array([len(t) > 0 for t in targets], dtype=bool)
    history = _grouped(users, user[old], catalog_pos[old])
    popularity = _popularity(conn, candidates, position[so_far], user[so_far], cut)
    pick = np.flatnonzero(keep)
    return Recall(users[keep], new_rows, [targets[i] for i in pick],
                  [exclude[i] for i in pick], [history[i] for i in pick], popularity, cut)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each wanted id in the sorted `ids`, -1 where absent."""
    if not len(ids):
        return np.full(len(wanted), -1)
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return np.where(ids[at] == wanted, at, -1)


def _grouped(users: np.ndarray, owner: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Per user in `users`, the unique values whose owner is that user."""
    order = np.argsort(owner, kind="stable")
    owner, values = owner[order], values[order]
    lo, hi = np.searchsorted(owner, users), np.searchsorted(owner, users, side="right")
    return [np.unique(values[a:b]) for a, b in zip(lo, hi, strict=True)]


def _popularity(conn, candidates: np.ndarray, position: np.ndarray, users: np.ndarray,
                cut: int) -> np.ndarray:
    """Distinct appreciating users up to the cut; distinct viewers break ties."""
    pairs = np.unique(np.stack([position, users]), axis=1)
    appreciations = np.bincount(pairs[0], minlength=len(candidates)).astype(np.float64)
    rows = conn.execute(
        "SELECT project_id, count(DISTINCT user_id) FROM interactions WHERE type = 0 "
        "AND seq <= %s AND project_id = ANY(%s) GROUP BY project_id",
        (cut, candidates.tolist())).fetchall()
    conn.commit()
    views = np.zeros(len(candidates))
    for project_id, count in rows:
        views[np.searchsorted(candidates, project_id)] = count
    return appreciations + views / (views.max() + 1)


def user_recall(source: str, recall: Recall, factors: Factors, item_vectors: np.ndarray,
                profile_vectors: np.ndarray | None) -> float:
    """recall@20 of one source. `item_vectors`: candidates' vectors (factor space for the
    collaborative CNNs, features otherwise); `profile_vectors`: catalog-row features for
    the profile of the non-collaborative sources."""
    if source == POPULARITY:
        users, items = np.ones((len(recall.users), 1)), recall.popularity[:, None]
    elif source in HEAD_MODE:
        users, items = factors.user_factors[factors.user_rows(recall.users)], item_vectors
    else:
        users, items = user_profiles(profile_vectors, recall.history), l2(item_vectors)
    return recall_at_k(users, items, recall.targets, RECALL_K, recall.exclude)


# -- the whole comparison -------------------------------------------------------------


def run(conn, data_dir: Path, config: EvalConfig, work_dir: Path,
        reader: ImageReader | None = None) -> Outcome:
    inputs = prepare(conn, data_dir, config, reader)
    catalog, factors, plan, sets = inputs.catalog, inputs.factors, inputs.plan, inputs.sets
    train_s: dict[str, float] = {}
    models, centroids = build_models(catalog, factors, sets, plan, work_dir, config.seed,
                                     config.progress, train_s)
    if centroids is None:  # a live pseudo-class version that did not record its centroids
        centroids = _refit_centroids(catalog, factors, sets, models[PSEUDO], config.seed)
    if config.imagenet_init:
        models.update(build_imagenet_init(catalog, factors, sets, plan, work_dir, config,
                                          train_s))
    recall = recall_protocol(conn, catalog, factors, inputs.factor_row, sets.new)
    history = np.concatenate([np.empty(0, np.int64), *(recall.history if recall else [])])
    pool = np.union1d(sets.held, history)
    pixels = read_images(catalog, pool, plan.model_config.image_size)
    features, heads, embed_s = {}, {}, {}
    for source, model in models.items():
        log.info("features: %s", source)
        started = time.monotonic()
        features[source], heads[source] = cnn_outputs(model, pixels)
        embed_s[source] = time.monotonic() - started
    started = time.monotonic()
    features[HANDCRAFTED] = handcrafted_features(pixels)
    embed_s[HANDCRAFTED] = time.monotonic() - started
    started = time.monotonic()
    features[IMAGENET] = imagenet_features(catalog, pool, config.imagenet_size)
    embed_s[IMAGENET] = time.monotonic() - started
    at = {"held": np.searchsorted(pool, sets.held), "pool": pool}
    results = _image_results(catalog, factors, sets, features, at, config.seed)
    if recall is not None:
        results += _recall_results(recall, catalog, factors, features, heads, centroids, at)
    results += warm_up_curve(conn, data_dir, catalog, factors, sets, heads, at)
    world = _world(inputs.truth, inputs.factor_row, inputs.cnn_row, plan, sets, recall)
    world["imagenet_image_size"] = config.imagenet_size
    if config.imagenet_init:
        world["imagenet_init"] = {"backbone": IMAGENET_BACKBONE,
                                  "epochs": config.imagenet_init_epochs,
                                  "image_size": plan.model_config.image_size}
    world["seconds"] = {source: {"train": round(train_s.get(source, 0.0), 1),
                                 "embed": round(embed_s[source], 1)} for source in embed_s}
    return Outcome(world, results, neighbours(catalog, factors, sets, features, at,
                                              config.seed))


def imagenet_features(catalog: Catalog, rows: np.ndarray, image_size: int) -> np.ndarray:
    """Frozen ImageNet MobileNetV2 features of the same serving view (centre square),
    read again at the size ImageNet features need."""
    from shared import imagenet

    log.info("features: %s at %d px", IMAGENET, image_size)
    pixels = read_images(catalog, rows, image_size)
    return imagenet.features(pixels)  # on CUDA when present, as training does


def warm_up_curve(conn, data_dir, catalog, factors, sets, heads, at) -> list[dict]:
    """The collaborative CNN's vectors of the new projects, warmed up (evaluate/warmup.py)."""
    from shared.settings import load_settings

    if not len(sets.new):
        return []
    vectors = factor_space(REGRESS, heads[REGRESS][np.searchsorted(at["pool"], sets.new)],
                           None)
    params = warmup.fold.WarmParams.from_settings(load_settings(data_dir=data_dir))
    return warmup.curve(conn, catalog.ids[sets.new], vectors, factors, params)


def _refit_centroids(catalog, factors, sets, model, seed) -> np.ndarray:
    # Same K-means the refresh runs (same k and seed), on our rebuild of its train split.
    log.warning("live pseudo-class version has no centroids; re-running K-means")
    item_factors = factors.item_factors[factors.item_rows(catalog.ids[sets.train])]
    return make_targets(item_factors, "pseudo-class", k=model.config.out_dim,
                        seed=seed).centroids


def _image_results(catalog, factors, sets, features, at, seed) -> list[dict]:
    style, category = catalog.style[sets.held], catalog.category[sets.held]
    results = []
    for source in [s for s in (*CNN_SOURCES, IMAGENET, HANDCRAFTED) if s in features]:
        scores = image_tasks(features[source][at["held"]], style, category, seed)
        results += [result(task, source, score, len(sets.held))
                    for task, score in scores.items()]
    rows = sets.held_factor
    if len(rows) >= 2:
        latent = factors.item_factors[factors.item_rows(catalog.ids[rows])]
        scores = image_tasks(latent, catalog.style[rows], catalog.category[rows], seed)
        results += [result(task, FACTORS, score, len(rows)) for task, score in scores.items()]
    return results


def _recall_results(recall, catalog, factors, features, heads, centroids, at) -> list[dict]:
    candidates = np.searchsorted(at["pool"], recall.candidates)
    results = []
    for source in [s for s in RECALL_SOURCES if s in features or s == POPULARITY]:
        if source in HEAD_MODE:
            items = factor_space(source, heads[source][candidates], centroids)
            score = user_recall(source, recall, factors, items, None)
        elif source == POPULARITY:
            score = user_recall(source, recall, factors, recall.popularity, None)
        else:
            profile = np.zeros((len(catalog.ids), features[source].shape[1]), np.float32)
            profile[at["pool"]] = l2(features[source])
            score = user_recall(source, recall, factors, features[source][candidates],
                                profile)
        results.append(result(USER_RECALL, source, score, len(recall.users)))
    return results


def result(task: str, source: str, score: float, n: int) -> dict:
    return {"task": task, "features": source, "score": float(score), "n": int(n)}


def neighbours(catalog, factors, sets, features, at, seed, queries: int = 4,
               k: int = 5) -> dict:
    """Top-k cosine neighbours among the held-out projects of a few held-out queries
    (taken from projects with factors, so the latent factors can answer too)."""
    pool = sets.held_factor if len(sets.held_factor) > k else sets.held
    rng = np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(pool, min(queries, len(pool)), replace=False))
    vectors = {source: l2(features[source][at["held"]]) for source in features}
    candidates = {source: sets.held for source in vectors}
    if len(sets.held_factor) > k:
        vectors[FACTORS] = l2(factors.item_factors[factors.item_rows(
            catalog.ids[sets.held_factor])])
        candidates[FACTORS] = sets.held_factor
    found = {}
    for source, x in vectors.items():
        rows = candidates[source]
        own = _index_of(rows, query_rows)
        sims = x[own] @ x.T
        sims[np.arange(len(own)), own] = -np.inf  # a query is not its own neighbour
        found[source] = rows[np.argsort(-sims, axis=1, kind="stable")[:, :k]]
    return {"queries": query_rows, "neighbours": found, "paths": catalog.paths,
            "style": catalog.style, "category": catalog.category, "reader": catalog.reader}


def _index_of(rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    lookup = {int(row): n for n, row in enumerate(rows)}
    return np.array([lookup[int(w)] for w in wanted], dtype=np.int64)


def _world(truth, factor_row, cnn_row, plan, sets, recall) -> dict:
    meta = truth.meta
    keys = ("users", "projects", "events", "seed", "n_styles", "n_categories")
    return {**{key: meta.get(key) for key in keys},
            "factor_version": factor_row["id"],
            "cnn_version": cnn_row["id"] if cnn_row else None,
            "live_cnn_mode": plan.live["mode"] if plan.live else None,
            "backbone": plan.model_config.backbone,
            "image_size": plan.model_config.image_size,
            "epochs": plan.train_config.epochs, "feature_layer": "penultimate",
            "val_fraction": plan.val_fraction, "holdout_salt": plan.holdout_salt,
            "pseudo_classes": plan.pseudo_classes,
            "train_projects": len(sets.train), "held_out_with_factors": len(sets.held_factor),
            "new_projects": len(sets.new),
            "recall_users": len(recall.users) if recall else 0,
            "recall_cut_seq": recall.cut_seq if recall else None}
