import numpy as np
import pytest
import torch
from PIL import Image

from shared.vision import (
    ModelConfig,
    build_model,
    device,
    embed_images,
    load_backbone_weights,
    load_model,
    preprocess,
    read_pixels,
    save_model,
)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(40, 40), (30, 60), (70, 35)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*shape, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("backbone,stem,size,dim", [
    ("small", "small-image", 32, 128), ("resnet18", "small-image", 64, 512),
    ("resnet18", "imagenet", 64, 512)])
def test_models_output_factor_dimension_and_unit_features(backbone, stem, size, dim):
    torch.manual_seed(0)
    config = ModelConfig(backbone=backbone, out_dim=16, image_size=size, head="mlp", stem=stem)
    model = build_model(config).eval()
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (2, 16)
        assert model.feature_dim == dim
        norms = model.embed(x).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(2))


def test_embed_images_accepts_paths_and_pil_and_is_normalized(images):
    torch.manual_seed(0)
    model = build_model(ModelConfig(out_dim=8, image_size=32))
    from_paths = embed_images(model, images, batch_size=2, device="cpu")
    from_pil = embed_images(model, [Image.open(p) for p in images], device="cpu")
    assert from_paths.dtype == np.float32 and from_paths.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(from_paths, from_pil, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(embed_images(model, images, batch_size=2, num_workers=1),
                                  from_paths)
    model.config = ModelConfig(out_dim=8, image_size=32, feature="penultimate")
    assert embed_images(model, images).shape == (3, 128)


def test_save_and_load_round_trip(images, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(out_dim=8, image_size=32, feature="penultimate")
    model = build_model(config)
    path = save_model(tmp_path / "out" / "m.pt", model, extra={"factor_version_id": 7})
    loaded, extra = load_model(path, "cpu")
    assert loaded.config == config and extra == {"factor_version_id": 7}
    assert not loaded.training
    np.testing.assert_array_equal(embed_images(loaded, images), embed_images(model, images))
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary left behind


def test_preprocessing_centre_crops_and_normalizes(images):
    wide = preprocess(images[1], 24)
    assert wide.shape == (3, 24, 24) and wide.dtype == torch.float32
    pixels = read_pixels(images[1], 24)
    assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 255 - mean[:, None, None]) / \
        std[:, None, None]
    torch.testing.assert_close(wide, expected)
    gray = Image.open(images[0]).convert("L")
    assert preprocess(gray, 24).shape == (3, 24, 24)


def test_pretrained_backbone_loads_from_local_torchvision_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18(weights=None).state_dict()
    torch.save(reference, tmp_path / "resnet18.pth")
    model = build_model(ModelConfig(backbone="resnet18", out_dim=4, image_size=64))
    report = load_backbone_weights(model, tmp_path / "resnet18.pth")
    assert "conv1.weight" in report["skipped"] and "fc.weight" in report["skipped"]
    assert "layer4.1.bn2.running_var" in report["loaded"]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    imagenet = build_model(ModelConfig(backbone="resnet18", out_dim=4, stem="imagenet"))
    report = load_backbone_weights(imagenet, tmp_path / "resnet18.pth")
    assert report["skipped"] == ["fc.weight", "fc.bias"]


def test_transparent_pixels_are_shown_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    rgba[:4, :, :] = [255, 0, 0, 255]  # opaque red top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    pixels = read_pixels(tmp_path / "t.png", 8)
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[7, 7].tolist() == [255, 255, 255]


def test_device_is_cpu_without_cuda():
    assert device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError):
        ModelConfig(backbone="vit")
