"""Images to vectors with one CNN version, one failure reason per unreadable image.

`shared.vision.embed_images` raises on the first bad image; here a bad image only loses
its own row, so one corrupt upload never blocks a batch or a backfill. Images are read
through the process's `shared.images.ImageReader` (policy, bounds, cache; remote fetches
run concurrently) and decoded here, a few at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from services.embedder.states import State
from shared.cnn import load_cnn
from shared.images import ImageError, ImageReader, ordered
from shared.settings import Settings
from shared.vision import autocast, resize_crop, to_tensor

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


def load(reader: ImageReader, data: bytes | ImageError,
         image_size: int) -> tuple[torch.Tensor | None, ImageError | None]:
    """(tensor, None) or (None, why): the model's input, or why there is none."""
    try:
        if isinstance(data, ImageError):
            raise data
        return to_tensor(resize_crop(reader.decode(data, image_size), image_size)), None
    except ImageError as error:
        return None, error


class Encoder:
    """One CNN version in eval mode on the chosen device."""

    def __init__(self, settings: Settings, version_row: dict,
                 reader: ImageReader | None = None):
        self.settings = settings
        self.reader = reader or ImageReader.from_settings(settings)
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
            failed += [(item, error.reason) for item, _, error in batch if error]
            good = [(item, tensor) for item, tensor, error in batch if not error]
            if good:
                vectors = self._forward(torch.stack([tensor for _, tensor in good]))
                rows += [self.row(item, vector) for (item, _), vector in zip(good, vectors,
                                                                             strict=True)]
        return Result(rows, failed, time.perf_counter() - started)

    def _decode(self, items: list[State], size: int) -> Iterator[tuple]:
        """Decoded images in order. The reader fetches concurrently; a thread pool decodes
        ahead while the model runs (PIL releases the GIL while decoding; threads, unlike
        DataLoader processes, are not forked from a process holding gRPC and Kafka client
        threads), a bounded window ahead so memory stays bounded too."""
        fetched = self.reader.fetch_many(item.image_uri for item in items)

        def one(data: bytes | ImageError) -> tuple:
            return load(self.reader, data, size)

        if self.pool is None or len(items) < WORKERS_FROM:
            return map(one, fetched)
        return ordered(self.pool, one, fetched, 2 * self.settings.embed_workers)

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
