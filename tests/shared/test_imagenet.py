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


def test_fine_tuning_from_imagenet_lowers_the_loss_on_tiny(tmp_path):
    """mobilenet_v2 started from the packaged ImageNet weights, trained on the tiny world's
    images to a style-driven target, ends its run with a lower loss than it began."""
    from services.simulate.render import render_image
    from services.simulate.world import build_world, preset
    from shared.training.train import Split, TrainConfig, train
    from shared.vision import ModelConfig, build_model, load_backbone_weights, load_model

    world = build_world(preset("tiny"))
    paths = []
    for j in range(96):
        paths.append(str(tmp_path / f"{j}.png"))
        Image.fromarray(render_image(world, j, 64)).save(paths[-1])
    targets = np.random.default_rng(0).normal(size=(world.config.n_styles, 8))[world.style[:96]]
    config = ModelConfig(backbone="mobilenet_v2", out_dim=8, image_size=64)
    start = build_model(config)
    report = load_backbone_weights(start, imagenet.init_weights("mobilenet_v2", "imagenet",
                                                                None))
    assert all(k.startswith("classifier") for k in report["skipped"])
    assert len(report["loaded"]) > 300
    init = imagenet.start_model(config, imagenet.weights_path(), tmp_path / "start" / "i.pt")
    saved, _ = load_model(init, "cpu")
    for name, tensor in start.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(saved.state_dict()[name], tensor), name
    result = train(config, Split(paths, targets.astype(np.float32)), None,
                   TrainConfig(epochs=4, batch_size=16, warmup_steps=4, lr=1e-3,
                               num_workers=0), tmp_path / "run", init_from=init,
                   device=torch.device("cpu"))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses


def test_init_weights_resolution_and_errors(tmp_path):
    assert imagenet.init_weights("small", "scratch", None) is None
    # auto (the default): ImageNet where the weights are packaged, scratch elsewhere.
    assert imagenet.init_weights("mobilenet_v2", "auto", None) == imagenet.weights_path()
    assert imagenet.init_weights("small", "auto", None) is None
    assert imagenet.init_weights("resnet18", "auto", None) is None
    assert [imagenet.resolve_init(b, "auto") for b in ("mobilenet_v2", "small")] == [
        "imagenet", "scratch"]
    assert imagenet.resolve_init("mobilenet_v2", "scratch") == "scratch"
    assert imagenet.init_weights("mobilenet_v2", "imagenet", None) == imagenet.weights_path()
    assert imagenet.init_weights("resnet18", "scratch", tmp_path / "r.pth") == tmp_path / "r.pth"
    with pytest.raises(imagenet.WeightsError, match="needs COFEAT_CNN_WEIGHTS"):
        imagenet.init_weights("resnet18", "imagenet", None)
    from shared.vision import ModelConfig, build_model, load_backbone_weights

    model = build_model(ModelConfig(backbone="resnet18"))
    with pytest.raises(imagenet.WeightsError, match="does not fit the resnet18 backbone"):
        load_backbone_weights(model, imagenet.weights_path())
    with pytest.raises(imagenet.WeightsError, match="does not exist"):
        load_backbone_weights(model, tmp_path / "missing.pth")
