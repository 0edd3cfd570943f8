import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from prometheus_client import REGISTRY

from shared.training.data import Augment, ImageTargets, collate, crop_box, holdout_mask
from shared.training.train import Split, TrainConfig, train
from shared.vision import ModelConfig, preprocess
from tests.synth import make_world


def _with_bad_images(tmp_path):
    world = make_world(tmp_path / "img", n=24, size=40)
    corrupt = tmp_path / "img" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    truncated = tmp_path / "img" / "truncated.png"
    truncated.write_bytes(Path(world.paths[0]).read_bytes()[:200])
    missing = str(tmp_path / "img" / "missing.png")
    paths = world.paths[:20] + [str(corrupt), missing, str(truncated)]
    return paths, np.zeros((len(paths), 8), np.float32) + 1, {str(corrupt), missing,
                                                              str(truncated)}


def test_unreadable_images_are_dropped_from_the_batch_and_reported(tmp_path):
    paths, targets, bad = _with_bad_images(tmp_path)
    data = ImageTargets(paths, targets, 32)
    batch = collate([data[i] for i in range(len(paths))])
    assert len(batch) == 20 and batch.images.shape == (20, 3, 32, 32)
    assert sorted(batch.failed) == [20, 21, 22]
    assert len(collate([data[20], data[21]])) == 0


def test_training_skips_and_counts_corrupt_and_missing_images(tmp_path):
    torch.set_num_threads(2)
    paths, targets, bad = _with_bad_images(tmp_path)
    before = REGISTRY.get_sample_value("cofeat_train_skipped_images_total") or 0
    config = TrainConfig(epochs=2, batch_size=8, num_workers=1)
    result = train(ModelConfig(out_dim=8, image_size=32), Split(paths, targets),
                   Split(paths[-4:], targets[-4:]), config, tmp_path / "out")
    assert set(result.skipped) == bad
    assert len(result.history) == 2
    # Counted once per image, not once per epoch or per split.
    assert REGISTRY.get_sample_value("cofeat_train_skipped_images_total") - before == 3


def test_bombs_and_refused_uris_are_skipped_by_training_in_little_memory(tmp_path):
    from shared.images import ImageReader
    from shared.settings import Settings
    from tests.bombs import jpeg_bomb, peak_rss_growth, png_bomb

    images = tmp_path / "data" / "images"
    world = make_world(images, n=2, size=40)
    reader = ImageReader.from_settings(Settings(data_dir=tmp_path / "data"))
    paths = [str(png_bomb(images / "bomb.png")), str(jpeg_bomb(images / "bomb.jpg")),
             "/etc/hostname", *world.paths]
    data = ImageTargets(paths, np.zeros((len(paths), 2), np.float32), 32, reader=reader)
    batches = []
    grown = peak_rss_growth(lambda: batches.append(collate(data.__getitems__(
        list(range(len(paths)))))))
    assert batches[0].failed == [0, 1, 2] and len(batches[0]) == 2
    assert grown < 100 * 1024 * 1024, grown


def test_a_dataloader_fetches_a_batch_through_the_reader(tmp_path):
    """Worker processes get the reader pickled (without its threads), and fetch each
    batch's images together (`__getitems__`)."""
    from torch.utils.data import DataLoader

    from shared.images import ImageReader
    from shared.settings import Settings

    world = make_world(tmp_path / "data" / "images", n=12, size=40)
    reader = ImageReader.from_settings(Settings(data_dir=tmp_path / "data"))
    data = ImageTargets([*world.paths, str(tmp_path / "outside.png")],
                        np.zeros((13, 2), np.float32), 32, reader=reader)
    loader = DataLoader(data, batch_size=5, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [5, 5, 2] and batches[-1].failed == [12]
    assert torch.equal(batches[0].images[1], data[1][0])


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    world = make_world(tmp_path, n=4, size=48)
    data = ImageTargets(world.paths, world.factors, 32, Augment(), seed=3)
    first = data[1][0]
    assert torch.equal(first, data[1][0])
    data.epoch = 1
    assert not torch.equal(first, data[1][0])
    data.epoch, data.seed = 0, 4
    assert not torch.equal(first, data[1][0])


def test_without_augmentation_training_sees_what_serving_sees(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)).save(path)
    data = ImageTargets([str(path)], np.zeros((1, 2)), 24)
    assert torch.equal(data[0][0], preprocess(str(path), 24))
    assert data[0][0].shape == (3, 24, 24)


def test_crop_boxes_stay_inside_near_the_centre_and_keep_most_of_the_image():
    rng = random.Random(0)
    aug = Augment()
    for _ in range(200):
        left, top, right, bottom = crop_box(100, 40, aug, rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 40
        assert (right - left) * (bottom - top) >= 0.6 * 40 * 40
        assert abs((left + right) / 2 - 50) <= 0.1 * 40 + 1  # serving sees the centre


def test_holdout_is_stable_per_project_and_near_the_fraction():
    ids = np.arange(1, 20001) * 7919
    mask = holdout_mask(ids, 0.1)
    assert 0.09 < mask.mean() < 0.11
    np.testing.assert_array_equal(holdout_mask(ids[::3], 0.1), mask[::3])
    assert not np.array_equal(holdout_mask(ids, 0.1, salt=1), mask)
