"""Images to vectors with one CNN version, one failure reason per unreadable image.

`shared.vision.embed_images` raises on the first bad image; here a bad image only loses
its own row, so one corrupt upload never blocks a batch or a backfill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.embedder.states import State
from shared.cnn import load_cnn
from shared.events import InvalidEvent, image_path
from shared.settings import Settings
from shared.vision import autocast, preprocess

log = logging.getLogger("cofeat.embed")

# Below this many images (a stream batch), decoding in the calling thread is quicker.
WORKERS_FROM = 256


@dataclass
class Result:
    rows: list[dict]
    failed: list[tuple[State, str]]  # (item, reason)
    seconds: float


def use_threads(count: int) -> None:
    """COFEAT_EMBED_TORCH_THREADS; 0 keeps torch's default of one thread per core, which
    oversubscribes the cores when CNN training runs beside the embedder and does the same."""
    if count:
        torch.set_num_threads(count)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve(uri: str, data_dir: Path) -> Path:
    """A path or file:// URI; relative paths are under COFEAT_DATA_DIR."""
    path = Path(image_path(uri))
    return path if path.is_absolute() else Path(data_dir) / path


def load(item: State, data_dir: Path, image_size: int) -> tuple[torch.Tensor | None, str]:
    """(tensor, "") or (None, reason): the model's input, or why there is none."""
    try:
        return preprocess(resolve(item.image_uri, data_dir), image_size), ""
    except InvalidEvent as error:
        return None, error.reason
    except Exception as error:  # PIL raises many types for broken files
        return None, f"{type(error).__name__}: {str(error)[:200]}"


class Encoder:
    """One CNN version in eval mode on the chosen device."""

    def __init__(self, settings: Settings, version_row: dict):
        self.settings = settings
        self.version_row = version_row
        self.version = int(version_row["id"])
        self.device = pick_device(settings.embed_device)
        self.model, self.meta = load_cnn(settings.data_dir, version_row, self.device)
        config = self.model.config
        self.feature = config.feature
        self.dim = config.out_dim if config.feature == "head" else self.model.feature_dim
        workers = settings.embed_workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers else None
        log.info("loaded CNN v%d (%s, feature %s, dim %d) on %s", self.version,
                 config.backbone, self.feature, self.dim, self.device)

    @torch.inference_mode()
    def embed(self, items: list[State]) -> Result:
        started = time.perf_counter()
        size = self.model.config.image_size
        decoded = self._decode(items, size)
        rows, failed = [], []
        batch_size = self.settings.embed_batch_size
        for start in range(0, len(items), batch_size):
            batch = [(item, *next(decoded)) for item in items[start:start + batch_size]]
            failed += [(item, reason) for item, _, reason in batch if reason]
            good = [(item, tensor) for item, tensor, reason in batch if not reason]
            if good:
                vectors = self._forward(torch.stack([tensor for _, tensor in good]))
                rows += [self.row(item, vector) for (item, _), vector in zip(good, vectors,
                                                                             strict=True)]
        return Result(rows, failed, time.perf_counter() - started)

    def _decode(self, items: list[State], size: int) -> Iterator[tuple]:
        """Decoded images in order; a thread pool decodes ahead while the model runs
        (PIL releases the GIL while decoding; threads, unlike DataLoader processes, are
        not forked from a process holding gRPC and Kafka client threads)."""
        def one(item: State) -> tuple:
            return load(item, self.settings.data_dir, size)

        if self.pool is None or len(items) < WORKERS_FROM:
            return map(one, items)
        return self.pool.map(one, items)

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        if self.model.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(batch.device):
            return self.model.embed(batch).float().cpu().numpy()

    def row(self, item: State, vector: np.ndarray) -> dict:
        return {"project_id": item.project_id, "embedding": vector.tolist(),
                "model_version": self.version, "owner_id": item.owner_id,
                "published_at": item.published_ms, "state_version": item.version}
