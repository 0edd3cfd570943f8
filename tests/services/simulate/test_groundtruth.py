import numpy as np
import pytest

from services.simulate.world import ground_truth
from shared import groundtruth


def test_round_trip(tmp_path, tiny_world):
    path = groundtruth.write(tmp_path, ground_truth(tiny_world))
    assert path == tmp_path / "groundtruth"
    truth = groundtruth.read(tmp_path)
    assert np.array_equal(truth.project_style, tiny_world.style)
    assert np.array_equal(truth.user_style_pref, tiny_world.style_pref)
    assert truth.meta["seed"] == 0 and truth.meta["users"] == 200
    assert truth.meta["n_palettes"] == 8
    ids = np.array([5, 1, 300])
    assert truth.style_of(ids).tolist() == tiny_world.style[ids - 1].tolist()
    assert truth.category_of(ids).tolist() == tiny_world.category[ids - 1].tolist()
    with pytest.raises(KeyError):
        truth.style_of([10_000])
