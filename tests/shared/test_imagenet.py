"""The packaged ImageNet MobileNetV2 loads offline and recognises a real photo.

tests/data/eagle.jpg: Debian's `darknet` package (usr/share/darknet/data/eagle.jpg),
reduced to 579 x 384 px at JPEG quality 90 (66 KB); a smaller copy
fell below the 0.5 bald-eagle probability.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared import imagenet
from shared.vision import resize_crop

PHOTO = Path(__file__).resolve().parents[1] / "data" / "eagle.jpg"
BALD_EAGLE = 22  # ImageNet-1k class index


def _photo(size: int) -> np.ndarray:
    return np.asarray(resize_crop(Image.open(PHOTO).convert("RGB"), size))[None]


def test_weights_load_offline_and_name_the_eagle():
    path = imagenet.weights_path()
    assert path.name == imagenet.WEIGHTS_FILE and path.stat().st_size > 10_000_000
    net = imagenet.mobilenet_v2()
    with torch.inference_mode():
        probs = torch.softmax(net(imagenet.normalize(_photo(224))), dim=1)[0]
    assert int(probs.argmax()) == BALD_EAGLE and float(probs.max()) > 0.5


def test_pooled_features_are_1280_d():
    out = imagenet.features(np.concatenate([_photo(96), _photo(96)]))
    assert out.shape == (2, imagenet.FEATURE_DIM) and out.dtype == np.float32
    assert np.allclose(out[0], out[1], atol=1e-5) and out.std() > 0


def test_missing_or_mismatched_weights_are_one_line_errors(tmp_path):
    with pytest.raises(imagenet.WeightsError, match="does not exist"):
        imagenet.mobilenet_v2(tmp_path / "nope.pth")
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(imagenet.WeightsError, match="does not fit") as error:
        imagenet.mobilenet_v2(tmp_path / "resnet18.pth")
    assert "\n" not in str(error.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(imagenet.WeightsError, match="not a torch state_dict"):
        imagenet.mobilenet_v2(tmp_path / "junk.pth")
