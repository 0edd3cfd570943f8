"""Train the image model to predict each project's latent factor (or its K-means class).

Reproducibility: every epoch's sampler and loader generators are seeded from (seed, epoch)
and augmentations from (seed, epoch, index), and a checkpoint after every epoch holds
model, optimizer, scheduler and RNG states. A run interrupted and resumed therefore ends
with the same weights, bit for bit on CPU, as one that never stopped.

With `world` (shared/training/distributed.py) every rank runs `train` on the same
arguments: DDP averages the gradients, each rank takes its share of the same draws at
its share of the batch, and rank 0 alone writes checkpoints and the model. The same
holds there: resumed on as many processes, a run ends as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prometheus_client import Counter, Gauge, Histogram
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from shared.images import ImageReader
from shared.training import distributed
from shared.training.data import (
    Augment,
    Batch,
    ImageTargets,
    collate,
    holdout_mask,
    seed_worker,
)
from shared.vision import CofeatNet, ModelConfig, atomic_torch_save, build_model, save_model

log = logging.getLogger(__name__)

IMAGES_PER_S = Gauge("cofeat_train_images_per_second", "Training throughput, recent batches")
LOSS = Gauge("cofeat_train_loss", "Training loss, exponential moving average")
VAL_SCORE = Gauge("cofeat_train_val_score",
                  "Held-out score: mean cosine (regress) or accuracy (pseudo-class)")
EPOCH_SECONDS = Histogram("cofeat_train_epoch_seconds", "Wall time of one training epoch",
                          buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))
SKIPPED = Counter("cofeat_train_skipped_images_total", "Images that could not be decoded")

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "regress"  # "regress" | "pseudo-class"
    loss: str = "cosine"  # regress only: "cosine" | "mse"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    seed: int = 0
    augment: Augment | None = field(default_factory=Augment)
    amp: bool = True  # only ever used on CUDA
    oversample: float = 4.0  # fine_tune: sampling weight of changed/new projects
    retrieval_k: int = 10
    keep_checkpoints: int = 2
    num_workers: int = 2  # not part of the result: augmentation does not depend on it


@dataclass
class Split:
    paths: Sequence[str]
    targets: np.ndarray  # float N x d (regress) or int N (pseudo-class)
    weights: np.ndarray | None = None  # sampling weights; None = uniform without replacement
    ids: np.ndarray | None = None  # project ids, for the caller's bookkeeping only
    reader: ImageReader | None = None  # how paths are read (None: local files)

    def __len__(self) -> int:
        return len(self.paths)


def make_splits(ids: np.ndarray, paths: Sequence[str], targets: np.ndarray,
                usable: np.ndarray | None = None, val_fraction: float = 0.1,
                salt: int = 0, reader: ImageReader | None = None) -> tuple[Split, Split]:
    """Train/held-out splits by project id hash (stable across refreshes), leaving out
    projects without a usable factor."""
    ids = np.asarray(ids)
    keep = np.ones(len(ids), bool) if usable is None else np.asarray(usable, bool)
    held = holdout_mask(ids, val_fraction, salt)

    def pick(mask: np.ndarray) -> Split:
        rows = np.flatnonzero(mask)
        return Split([paths[i] for i in rows], targets[rows], ids=ids[rows], reader=reader)

    return pick(keep & ~held), pick(keep & held)


@dataclass
class TrainResult:
    model: CofeatNet
    history: list[dict]
    metrics: dict
    skipped: list[str]
    model_path: Path


StepHook = Callable[[int, int, CofeatNet], None]
EpochHook = Callable[[int, CofeatNet, dict], None]


def train(model_config: ModelConfig, train_split: Split, val_split: Split | None,
          config: TrainConfig, out_dir: str | Path, *, init_from: str | Path | None = None,
          extra: dict | None = None, on_step: StepHook | None = None,
          on_epoch: EpochHook | None = None, progress: bool = False,
          device: torch.device | None = None,
          world: distributed.World | None = None) -> TrainResult:
    """Train (or resume) into out_dir: checkpoints/, model.pt, curves.png.

    `init_from` starts from another model's weights (fine-tuning). `on_step(epoch, step,
    model)` runs before every optimizer step; raising from it interrupts the run.
    `on_epoch(epoch, model, row)` runs after each epoch's checkpoint (not for epochs a
    resumed run skips); the next epoch puts the model back in training mode. Both run on
    every rank of a `world`.
    """
    _check(model_config, train_split, config)
    out_dir = Path(out_dir)
    if world is not None:
        device = device or world.device
        progress = progress and world.leader
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    model = build_model(model_config)
    if init_from is not None:
        init_weights(model, init_from)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size; CPU runs stay bit-exact
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    if world is not None:
        steps_per_epoch = math.ceil(math.ceil(len(train_split) / world.size)
                                    / distributed.local_batch(config.batch_size, world))
    scheduler = _scheduler(optimizer, config, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=_amp_dtype(device, config) == torch.float16)
    fingerprint = _fingerprint(model_config, train_split, val_split, config, init_from, world)
    state = {"epoch": -1, "history": [], "skipped": []}
    ckpt_dir = out_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if world is None or world.leader else None
    latest = distributed.broadcast(world, latest)  # the leader's choice, read by every rank
    if latest is not None:
        state = _resume(latest, fingerprint, model, optimizer, scheduler, scaler)
        log.info("resuming from %s (epoch %d done)", latest, state["epoch"] + 1)
    net = distributed.wrap(model, world)  # after resuming: DDP starts every rank from it

    train_data = ImageTargets(train_split.paths, train_split.targets, model_config.image_size,
                              config.augment, config.seed, reader=train_split.reader)
    val_data = None
    if val_split is not None and len(val_split):
        val_data = ImageTargets(val_split.paths, val_split.targets, model_config.image_size,
                                reader=val_split.reader)
    skipped = set(state["skipped"])
    first = state["epoch"] + 1
    # One bar for the whole run, so its rate is images/s and its ETA the run's end.
    bar = tqdm(total=(config.epochs - first) * len(train_data), unit="img",
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    for epoch in range(first, config.epochs):
        started = time.monotonic()
        train_loss, seen = _run_epoch(model, train_data, train_split.weights, optimizer,
                                      scheduler, scaler, config, epoch, device, skipped,
                                      on_step, bar, net, world)
        distributed.same_buffers(model, world)
        seconds = time.monotonic() - started
        EPOCH_SECONDS.observe(seconds)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": round(seconds, 2),
               "images_per_s": round(seen / max(seconds, 1e-9), 1),
               "lr": scheduler.get_last_lr()[0]}
        if val_data is not None:
            row.update(evaluate(model, val_data, config, device, skipped, world=world))
            VAL_SCORE.set(row["val_score"])
        skipped |= distributed.union(world, skipped)
        state["history"].append(row)
        state["skipped"] = sorted(skipped)
        if world is None or world.leader:
            _save_checkpoint(ckpt_dir, epoch, fingerprint, model, optimizer, scheduler,
                             scaler, state, config.keep_checkpoints)
        log.info("epoch %s", json.dumps(row))
        if on_epoch is not None:
            on_epoch(epoch, model, row)
    bar.close()
    return _finish(model, model_config, config, state, out_dir, extra,
                   write=world is None or world.leader)


def fine_tune(parent: str | Path, train_split: Split, val_split: Split | None,
              changed: np.ndarray, config: TrainConfig, out_dir: str | Path,
              out_dim: int | None = None, **kwargs) -> TrainResult:
    """Continue a parent model on new targets, sampling changed/new projects more often.

    The parent's architecture is kept. `out_dim` defaults to the targets' dimension
    (regress) or the parent's (pseudo-class); if it changed, the head is re-initialized
    and only the backbone is inherited.
    """
    parent_config = ModelConfig.from_dict(_read_payload(parent)["config"])
    if out_dim is None:
        out_dim = parent_config.out_dim if config.mode == "pseudo-class" \
            else train_split.targets.shape[1]
    model_config = replace(parent_config, out_dim=out_dim)
    weights = np.where(np.asarray(changed, dtype=bool), config.oversample, 1.0)
    split = replace(train_split, weights=weights.astype(np.float64))
    extra = {"parent": str(parent), **kwargs.pop("extra", {})}
    return train(model_config, split, val_split, config, out_dir, init_from=parent,
                 extra=extra, **kwargs)


# -- one epoch ------------------------------------------------------------------------


def _run_epoch(model, data, weights, optimizer, scheduler, scaler, config, epoch, device,
               skipped, on_step, bar, net=None, world=None) -> tuple[float, int]:
    model.train()
    loader = make_loader(data, config, epoch, weights=weights, device=device, world=world)
    amp_dtype = _amp_dtype(device, config)
    total, seen, ema, window = 0.0, 0, None, time.monotonic()
    bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
    for step, batch in enumerate(loader):
        _note_skipped(batch, data, skipped)
        # A rank whose batch failed to decode entirely holds the others back for a step.
        if not distributed.everyone(world, len(batch) > 0):
            continue
        if on_step is not None:
            on_step(epoch, step, model)
        loss = _step(model, batch, optimizer, scaler, config, device, amp_dtype, net)
        if not math.isfinite(loss):
            # Stop rather than checkpoint garbage; the last good epoch stays resumable.
            raise FloatingPointError(f"loss {loss} at epoch {epoch + 1} step {step}")
        scheduler.step()
        total += loss * len(batch)
        seen += len(batch)
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        LOSS.set(ema)
        now = time.monotonic()
        IMAGES_PER_S.set(len(batch) / max(now - window, 1e-9))
        window = now
        bar.update(len(batch) + len(batch.failed))
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
    total, seen = distributed.total(world, total, seen)
    return total / max(seen, 1), int(seen)


def _step(model, batch: Batch, optimizer, scaler, config, device, amp_dtype,
          net=None) -> float:
    images = batch.images.to(device, non_blocking=True)
    if model.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = batch.targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        outputs = (model if net is None else net)(images)
    loss = loss_fn(outputs.float(), targets, config)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.mode == "pseudo-class":
        return F.cross_entropy(outputs, targets)
    if config.loss == "mse":
        return F.mse_loss(outputs, targets)
    return (1 - F.cosine_similarity(outputs, targets, dim=1)).mean()


def make_loader(data: ImageTargets, config: TrainConfig, epoch: int, *,
                weights: np.ndarray | None = None, shuffle: bool = True,
                device: torch.device | None = None,
                world: distributed.World | None = None) -> DataLoader:
    """Batches of one epoch. With `weights`, sampling is with replacement (over-sampling).
    In a `world`, this rank's share: of the epoch's draws, at its share of the batch."""
    # Fresh generators per epoch, seeded from (seed, epoch): resuming at any epoch
    # boundary replays exactly the order an uninterrupted run would have used.
    sampler_gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0))
    loader_gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1))
    data.epoch = epoch
    sampler = None
    if shuffle:
        sampler = RandomSampler(data, generator=sampler_gen) if weights is None else \
            WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(data),
                                  replacement=True, generator=sampler_gen)
    batch_size = config.batch_size
    if world is not None:
        sampler = distributed.ShardSampler(sampler, world) if shuffle else \
            distributed.inference_shard(len(data), world)
        batch_size = distributed.local_batch(batch_size, world) if shuffle else batch_size
    workers = config.num_workers
    pin = device is not None and device.type == "cuda"
    return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, collate_fn=collate, worker_init_fn=seed_worker,
                      generator=loader_gen, pin_memory=pin,
                      prefetch_factor=4 if workers else None)


def _note_skipped(batch: Batch, data: ImageTargets, skipped: set[str]) -> None:
    for index in batch.failed:
        path = data.paths[index]
        if path not in skipped:
            skipped.add(path)
            SKIPPED.inc()
            log.warning("skipping unreadable image %s", path)


# -- validation -----------------------------------------------------------------------


@torch.inference_mode()
def predict(model: CofeatNet, data: ImageTargets, config: TrainConfig, device,
            skipped: set[str] | None = None,
            world: distributed.World | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs and targets for every decodable sample, in dataset order (in a
    `world`: each rank infers its share, and every rank gets all of them)."""
    model.eval()
    loader = make_loader(data, config, 0, shuffle=False, device=device, world=world)
    outputs, targets, indices = [], [], []
    amp_dtype = _amp_dtype(device, config)
    for batch in loader:
        if skipped is not None:
            _note_skipped(batch, data, skipped)
        if not len(batch):
            continue
        images = batch.images.to(device)
        if model.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            outputs.append(model(images).float().cpu())
        targets.append(batch.targets)
        indices.append(batch.indices)
    model.train()
    if world is not None:
        outputs, targets = _gathered(world, outputs, targets, indices)
    if not outputs:
        return torch.empty(0), torch.empty(0)
    return torch.cat(outputs), torch.cat(targets)


def _gathered(world, outputs, targets, indices) -> tuple[list, list]:
    """Every rank's predictions, back in dataset order."""
    parts = [part for part in distributed.gather(world, (outputs, targets, indices)) if part[0]]
    if not parts:
        return [], []
    order = torch.cat([torch.cat(index) for _, _, index in parts]).argsort()
    return ([torch.cat([torch.cat(out) for out, _, _ in parts])[order]],
            [torch.cat([torch.cat(tgt) for _, tgt, _ in parts])[order]])


def evaluate(model: CofeatNet, data: ImageTargets, config: TrainConfig, device,
             skipped: set[str] | None = None, world: distributed.World | None = None) -> dict:
    """Held-out scores. `val_score` is what model selection compares."""
    outputs, targets = predict(model, data, config, device, skipped, world)
    if not len(outputs):
        return {"val_score": float("nan")}
    scores = {"val_loss": loss_fn(outputs, targets, config).item()}
    if config.mode == "pseudo-class":
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        scores["val_accuracy"] = (top[:, 0] == targets).float().mean().item()
        scores["val_top5"] = (top == targets[:, None]).any(1).float().mean().item()
        scores["val_score"] = scores["val_accuracy"]
        return scores
    pred, true = F.normalize(outputs, dim=1), F.normalize(targets, dim=1)
    scores["val_cosine"] = (pred * true).sum(1).mean().item()
    scores[f"val_recall@{config.retrieval_k}"] = self_recall(pred, true, config.retrieval_k)
    scores["val_score"] = scores["val_cosine"]
    return scores


def self_recall(pred: torch.Tensor, true: torch.Tensor, k: int) -> float:
    """Share of items whose own factor is among the k factors nearest their prediction:
    can the image alone find its project among all held-out ones."""
    k = min(k, len(true))
    hits = 0
    for start in range(0, len(pred), 4096):
        sims = pred[start:start + 4096] @ true.T
        own = torch.arange(start, start + len(sims))
        top = sims.topk(k, dim=1).indices
        hits += (top == own[:, None]).any(1).sum().item()
    return hits / max(len(pred), 1)


# -- optimizer, schedule, weights -----------------------------------------------------


def _optimizer(model: CofeatNet, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases: decaying BN scales only fights the loss.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = min(config.warmup_steps, max(total_steps // 10, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _read_payload(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def init_weights(model: CofeatNet, path: str | Path) -> list[str]:
    """Load a parent model file or checkpoint; tensors whose shape changed (a head for a
    new factor dimension) keep their fresh initialization. Returns the names kept fresh."""
    payload = _read_payload(path)
    state = payload.get("state_dict") or payload["model"]
    own = model.state_dict()
    fresh = [k for k in own if k not in state or state[k].shape != own[k].shape]
    own.update({k: v for k, v in state.items() if k in own and k not in fresh})
    model.load_state_dict(own)
    if fresh:
        log.info("not inherited from %s: %s", path, ", ".join(fresh))
    return fresh


# -- checkpoints ----------------------------------------------------------------------


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(Path(ckpt_dir).glob("epoch-*.pt")) if Path(ckpt_dir).exists() else []
    return found[-1] if found else None


def _save_checkpoint(ckpt_dir, epoch, fingerprint, model, optimizer, scheduler, scaler,
                     state, keep) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
               "rng": _rng_state(), "history": state["history"],
               "skipped": state["skipped"]}
    path = atomic_torch_save(payload, Path(ckpt_dir) / f"epoch-{epoch + 1:04d}.pt")
    for old in sorted(Path(ckpt_dir).glob("epoch-*.pt"))[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def _resume(path, fingerprint, model, optimizer, scheduler, scaler) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} belongs to a different run (data or settings changed); "
                         "use a new output directory")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"])
    return {"epoch": payload["epoch"], "history": payload["history"],
            "skipped": payload["skipped"]}


def _rng_state() -> dict:
    # numpy's state as tensors/ints so checkpoints load with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(model_config, train_split, val_split, config, init_from,
                 world=None) -> str:
    """What a checkpoint must match to be resumed: everything that shapes the result (the
    number of processes too: it sets the steps per epoch)."""
    digest = hashlib.sha256()
    settings = asdict(config)
    settings.pop("num_workers")
    settings.pop("keep_checkpoints")
    shape = [asdict(model_config), settings, str(init_from)]
    if world is not None:
        shape.append({"processes": world.size})
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    for split in (train_split, val_split):
        if split is None:
            continue
        digest.update("\n".join(map(str, split.paths)).encode())
        digest.update(np.ascontiguousarray(split.targets).tobytes())
        if split.weights is not None:
            digest.update(np.ascontiguousarray(split.weights, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _check(model_config: ModelConfig, split: Split, config: TrainConfig) -> None:
    if config.mode not in ("regress", "pseudo-class"):
        raise ValueError(f"unknown mode {config.mode!r}")
    if not len(split):
        raise ValueError("empty training split")
    targets = np.asarray(split.targets)
    if config.mode == "pseudo-class":
        if targets.min() < 0 or targets.max() >= model_config.out_dim:
            raise ValueError("pseudo-class targets must lie in [0, out_dim)")
    elif targets.ndim != 2 or targets.shape[1] != model_config.out_dim:
        raise ValueError(f"targets {targets.shape} do not match out_dim "
                         f"{model_config.out_dim}")
    elif not np.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinity")


def _finish(model, model_config, config, state, out_dir, extra,
            write: bool = True) -> TrainResult:
    history = state["history"]
    metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history \
        else {}
    payload_extra = {"mode": config.mode, "train_config": asdict(config), "history": history,
                     "metrics": metrics, "skipped_images": len(state["skipped"]),
                     **(extra or {})}
    if not write:  # a follower: rank 0 writes the model
        return TrainResult(model.cpu().eval(), history, metrics, list(state["skipped"]),
                           out_dir / "model.pt")
    model_path = save_model(out_dir / "model.pt", model.cpu().eval(), model_config,
                            json.loads(json.dumps(payload_extra, default=str)))
    if history:
        from shared.training.curves import plot_curves

        plot_curves(history, out_dir / "curves.png")
    return TrainResult(model, history, metrics, list(state["skipped"]), model_path)
