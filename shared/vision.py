"""The image model shared by training (refresh) and serving (embedder).

One file holds a model: its state_dict plus the `ModelConfig` that rebuilds it, so the
embedder never needs training code. Preprocessing lives here too, so a project's image is
turned into the same tensor at training and at serving time (training only adds a random
crop box in front of it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

# ImageNet statistics: harmless when training from scratch, required for imported weights.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = 1
BACKBONES = ("small", "resnet18", "mobilenet_v2")


class WeightsError(ValueError):
    """A weights file is missing or does not fit the network; the message is one line."""

ImageInput = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small"  # "small" | "resnet18" | "mobilenet_v2"
    out_dim: int = 32  # factor dimension (regress) or number of pseudo-classes
    head: str = "linear"  # "linear" | "mlp"
    head_hidden: int = 256
    feature: str = "head"  # what embed() returns: "head" (factor space) | "penultimate"
    image_size: int = 64
    channels_last: bool = True
    stem: str = "small-image"  # resnet18 only: "small-image" (/2) | "imagenet" (/4)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"unknown head {self.head!r}")
        if self.feature not in ("head", "penultimate"):
            raise ValueError(f"unknown feature {self.feature!r}")
        if self.stem not in ("small-image", "imagenet"):
            raise ValueError(f"unknown stem {self.stem!r}")

    @classmethod
    def from_dict(cls, value: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


# -- architecture ---------------------------------------------------------------------


def _small_backbone() -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, 32, 64, 128):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


def _resnet18_backbone(stem: str) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if stem == "small-image":
        # The ImageNet stem (7x7 stride 2 + max-pool, /4) leaves a 2x2 map at 64 px and
        # averages away fine texture, the style users respond to. A 3x3 stride-2 conv
        # without max-pool (/2) ends at 4x4 for 64 px and 8x8 for 128 px, at ~4x the
        # compute. Key names stay torchvision's, so imported weights load except conv1;
        # "imagenet" keeps the original stem (cheaper, and conv1 loads too).
        net.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


class _MobileNetV2Backbone(nn.Module):
    """torchvision's mobilenet_v2 feature blocks, global-average pooled (1280-d). The
    attribute is named `features` as in torchvision, so its checkpoints load by name."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


class CofeatNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "small":
            self.backbone, self.feature_dim = _small_backbone()
        elif config.backbone == "mobilenet_v2":
            self.backbone, self.feature_dim = _MobileNetV2Backbone(), 1280
        else:
            self.backbone, self.feature_dim = _resnet18_backbone(config.stem)
        if config.head == "linear":
            self.head = nn.Linear(self.feature_dim, config.out_dim)
        else:
            self.head = nn.Sequential(
                nn.Linear(self.feature_dim, config.head_hidden), nn.ReLU(inplace=True),
                nn.Linear(config.head_hidden, config.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head output: factor estimate (regress) or class logits (pseudo-class)."""
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized feature used for retrieval."""
        features = self.backbone(x)
        if self.config.feature == "head":
            features = self.head(features)
        return F.normalize(features.float(), dim=1)


def build_model(config: ModelConfig) -> CofeatNet:
    model = CofeatNet(config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state_dict from a local file (a cofeat model file's too); a missing or unreadable
    file is a one-line WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"weights file {path} is not a torch state_dict: "
                           f"{type(error).__name__}") from None
    if not isinstance(payload, dict):
        raise WeightsError(f"weights file {path} holds no state_dict")
    return payload.get("state_dict", payload)


def load_backbone_weights(model: CofeatNet, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy matching tensors from a local state_dict file into the backbone.

    Accepts a plain torchvision state_dict or a cofeat model file. Tensors whose name or
    shape differ (the adapted stem, the classifier) are skipped and reported; a file that
    fills less than half of the backbone (another architecture) is a WeightsError.
    """
    state = read_state_dict(path)
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    own = model.backbone.state_dict()
    loaded, skipped = [], []
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if key in own and own[key].shape == tensor.shape:
            own[key] = tensor
            loaded.append(key)
        else:
            skipped.append(key)
    if len(loaded) < len(own) / 2:
        raise WeightsError(f"weights file {path} does not fit the {model.config.backbone} "
                           f"backbone: {len(loaded)} of its {len(own)} tensors match")
    model.backbone.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped}


# -- files ----------------------------------------------------------------------------


def save_model(path: str | os.PathLike, model: CofeatNet, config: ModelConfig | None = None,
               extra: dict | None = None) -> Path:
    """Write state_dict + config (+ JSON-like `extra`) to one file, atomically."""
    config = config or model.config
    payload = {"format": FORMAT_VERSION, "config": asdict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": extra or {}}
    return atomic_torch_save(payload, path)


def load_model(path: str | os.PathLike,
               device: torch.device | str | None = None) -> tuple[CofeatNet, dict]:
    """Rebuild a saved model in eval mode; returns (model, extra)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a cofeat model file (format {payload.get('format')})")
    model = build_model(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device or pick_device()).eval(), payload.get("extra", {})


def atomic_torch_save(payload: object, path: str | os.PathLike) -> Path:
    # Write beside the target, fsync, rename: a crash leaves the old file or the new one.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- preprocessing --------------------------------------------------------------------


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


device = pick_device  # the name other services call


def open_rgb(image: ImageInput, image_size: int | None = None) -> Image.Image:
    """Decode to RGB, bounded (shared.images.decode). A path is read as a file the caller
    chose (shared.images.local_files); image_uris from events go through an ImageReader.
    Raises shared.images.ImageError when there is no image."""
    from shared import images

    if isinstance(image, Image.Image):
        return images.rgb(image)
    return images.local_files().open(os.fspath(image), image_size)


def resize_crop(img: Image.Image, image_size: int,
                box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Crop `box` (default: the centred square), then resize to image_size x image_size.

    A square crop rather than a stretch: distorting aspect ratio changes texture scale.
    """
    if box is None:
        width, height = img.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    return img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box,
                      reducing_gap=2.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> normalized float CHW tensor."""
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    tensor = array.permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def preprocess(image: ImageInput, image_size: int) -> torch.Tensor:
    """The serving path: decode, centre square, resize, normalize."""
    return to_tensor(resize_crop(open_rgb(image, image_size), image_size))


def read_pixels(image: ImageInput, image_size: int) -> np.ndarray:
    """The same view as `preprocess`, as uint8 HxWx3 (for hand-crafted baselines)."""
    return np.asarray(resize_crop(open_rgb(image, image_size), image_size), dtype=np.uint8)


# -- inference ------------------------------------------------------------------------


@torch.inference_mode()
def embed_images(model: CofeatNet, images: Sequence[ImageInput], batch_size: int = 64,
                 device: torch.device | str | None = None,
                 num_workers: int = 0) -> np.ndarray:
    """L2-normalized float32 features, one row per image; unreadable images raise.

    `device` moves the model there (default: where it is). `num_workers` > 0 decodes in
    DataLoader worker processes, which pays off for large lists of paths.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    out = np.zeros((len(images), _embed_dim(model)), dtype=np.float32)
    loader = DataLoader(
        _Preprocessed(images, model.config.image_size), batch_size=batch_size,
        num_workers=num_workers, pin_memory=device.type == "cuda")
    start = 0
    for batch in loader:
        out[start:start + len(batch)] = _embed_batch(model, batch.to(device)).cpu().numpy()
        start += len(batch)
    return out


class _Preprocessed(Dataset):
    def __init__(self, images: Sequence[ImageInput], image_size: int) -> None:
        self.images, self.image_size = images, image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess(self.images[index], self.image_size)


def _embed_dim(model: CofeatNet) -> int:
    return model.config.out_dim if model.config.feature == "head" else model.feature_dim


def _embed_batch(model: CofeatNet, batch: torch.Tensor) -> torch.Tensor:
    if model.config.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(batch.device):
        return model.embed(batch)


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU it is slower and would break bit-exact tests."""
    enabled = device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
