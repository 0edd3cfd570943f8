"""Images and their targets for training: decode in DataLoader workers, skip bad files.

Randomness of an augmentation is a pure function of (seed, epoch, sample index), so it does
not depend on worker count, batch order or whether the run was resumed.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from shared import images
from shared.images import ImageReader
from shared.vision import resize_crop, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """Mild, style-preserving augmentation.

    Colour and texture scale are what users respond to, so crops stay large (scale is the
    crop's share of the centre square's area) and there is no colour jitter by default.
    Horizontal flips are off because they mirror lettering.
    """

    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.1  # max shift of the crop centre, as a share of the short side
    hflip: bool = False
    color_jitter: float = 0.0  # max relative change of brightness/contrast/saturation


def crop_box(width: int, height: int, aug: Augment,
             rng: random.Random) -> tuple[int, int, int, int]:
    """A random box near the centre square (what serving sees), `scale` of its area."""
    side = min(width, height)
    area = side * side * rng.uniform(*aug.scale)
    ratio = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    shift = aug.translate * side
    left = _clamp(round((width - w) / 2 + rng.uniform(-shift, shift)), 0, width - w)
    top = _clamp(round((height - h) / 2 + rng.uniform(-shift, shift)), 0, height - h)
    return left, top, left + w, top + h


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    from PIL import ImageEnhance

    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


class ImageTargets(Dataset):
    """(image_uri, target) pairs -> (image, target, index); image None if unreadable.

    Images are read through `reader` (the service's shared.images.ImageReader: its policy,
    bounds and cache; default: local files the caller chose). A batch's images are fetched
    concurrently (`__getitems__`) and decoded one after another in the worker process."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, image_size: int,
                 augment: Augment | None = None, seed: int = 0,
                 reader: ImageReader | None = None) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(targets)
        if self.targets.is_floating_point():
            self.targets = self.targets.float()
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # set before each epoch; workers are re-created so they see it
        self.reader = reader or images.local_files()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self._sample(index, self.reader.read_or_error(self.paths[index]))

    def __getitems__(self, indices: list[int]) -> list:
        fetched = self.reader.fetch_many([self.paths[i] for i in indices])
        return [self._sample(index, data) for index, data in zip(indices, fetched,
                                                                 strict=True)]

    def _sample(self, index: int, data: bytes | images.ImageError):
        try:
            if isinstance(data, images.ImageError):
                raise data
            img = self.reader.decode(data, self.image_size)
        except images.ImageError as error:
            log.debug("skipping %s: %s", self.paths[index], error.reason)
            return None, None, index
        return self._tensor(img, index), self.targets[index], index

    def _tensor(self, img: Image.Image, index: int) -> torch.Tensor:
        if self.augment is None:
            return to_tensor(resize_crop(img, self.image_size))
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        img = resize_crop(img, self.image_size, box=crop_box(*img.size, self.augment, rng))
        if self.augment.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment.color_jitter:
            img = _jitter(img, self.augment.color_jitter, rng)
        return to_tensor(img)


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    failed: list[int]  # dataset indices that could not be decoded

    def __len__(self) -> int:
        return len(self.indices)


def collate(samples: list) -> Batch:
    """Stack the samples that decoded; report the others instead of failing the batch."""
    good = [s for s in samples if s[0] is not None]
    failed = [index for image, _, index in samples if image is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), failed)
    images, targets, indices = zip(*good, strict=True)
    return Batch(torch.stack(images), torch.stack(targets),
                 torch.tensor(indices, dtype=torch.long), failed)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it so
    # any library randomness in a worker is reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def holdout_mask(ids: Sequence[int] | np.ndarray, fraction: float, salt: int = 0) -> np.ndarray:
    """True for the held-out share of projects, decided by a hash of the project id.

    Membership is stable across refreshes and data sizes, so a fine-tuned model is never
    validated on projects its parent trained on.
    """
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # splitmix64: wrapping arithmetic is the point
        x = x + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))
