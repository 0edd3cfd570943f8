"""Training with DistributedDataParallel: the sharding on its own, then two gloo processes
under a real torchrun (tests/shared/training/ddp_job.py)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler

from shared.training import distributed
from shared.training.data import ImageTargets
from shared.training.train import TrainConfig, make_loader
from tests.synth import make_world


def results(history: list[dict]) -> list[dict]:
    """A run's history without its timings."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
            for row in history]


def ranks(size: int) -> list[distributed.World]:
    return [distributed.World(rank, size, rank, torch.device("cpu")) for rank in range(size)]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_shards_deal_out_the_single_process_draws(weighted, size):
    n = 101

    def sampler():
        gen = torch.Generator().manual_seed(7)  # every rank seeds alike, as make_loader does
        if weighted:
            return WeightedRandomSampler(torch.linspace(1, 4, n, dtype=torch.double), n,
                                         generator=gen)
        return RandomSampler(range(n), generator=gen)

    draws = list(sampler())
    shards = [list(distributed.ShardSampler(sampler(), world)) for world in ranks(size)]
    assert len({len(shard) for shard in shards}) == 1  # same number of steps everywhere
    dealt = [index for step in zip(*shards, strict=True) for index in step]
    assert dealt[:n] == draws  # the single process's draws, in its order...
    assert dealt[n:] == draws[:len(dealt) - n]  # ...padded with its first ones


def test_loader_batches_are_the_ranks_share(tmp_path):
    world = make_world(tmp_path, n=40, size=16)
    data = ImageTargets(world.paths, world.factors, 16)
    config = TrainConfig(batch_size=8, num_workers=0, augment=None)
    seen = []
    for member in ranks(2):
        batches = list(make_loader(data, config, 0, world=member))
        assert [len(b) for b in batches] == [4] * 5  # half of the global batch of 8
        seen.append(torch.cat([b.indices for b in batches]))
    single = torch.cat([b.indices for b in make_loader(data, config, 0)])
    assert torch.equal(torch.stack(seen, 1).flatten(), single)
    inference = [torch.cat([b.indices for b in make_loader(data, config, 0, shuffle=False,
                                                           world=member)])
                 for member in ranks(2)]
    assert sorted(torch.cat(inference).tolist()) == list(range(40))  # no padding


def test_a_single_process_has_no_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.join() is None and distributed.current() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.join() is None  # torchrun with one process: the plain path
    assert distributed.call(lambda x, y=0: x + y, 2, y=3) == 5
    assert distributed.local_batch(64, None) == 64


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun of two CPU processes running ddp_job.py; its report."""
    root = tmp_path_factory.mktemp("ddp")
    world = make_world(root / "images", n=80, size=40)
    np.savez(root / "world.npz", paths=np.asarray(world.paths), factors=world.factors)
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = distributed.launch_command(2, ["-m", "tests.shared.training.ddp_job",
                                             str(root), str(out)])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def test_ranks_train_one_model_and_only_rank_0_writes(two_ranks):
    leader, follower = two_ranks["ranks"]
    assert leader["whole"] == follower["whole"]  # DDP kept the replicas equal
    assert leader["tuned"] == follower["tuned"] != leader["whole"]  # a fine-tune, too
    assert follower["writes"] == []
    assert results(follower["history"]) == results(leader["history"])  # over all ranks
    losses = [row["train_loss"] for row in leader["history"]]
    assert losses[-1] < losses[0], losses
    assert {"whole/model.pt", "whole/curves.png", "whole/checkpoints/epoch-0003.pt",
            "split/model.pt", "tuned/model.pt", "job/model.pt"} <= set(two_ranks["files"])


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(two_ranks):
    leader, follower = two_ranks["ranks"]
    assert two_ranks["checkpoints_at_interrupt"] == ["epoch-0001.pt"]
    assert leader["resumed"] == leader["whole"] == follower["resumed"]
    assert results(two_ranks["resumed_history"]) == results(two_ranks["history"])


def test_a_job_handed_out_by_the_leader_trains_the_same_model(two_ranks):
    assert two_ranks["job"] == two_ranks["ranks"][0]["whole"]


def test_sharded_inference_matches_one_process(two_ranks):
    assert two_ranks["predict_rows"] == [16, 16]
    assert two_ranks["predict_max_diff"] < 1e-5


def test_a_job_failing_on_one_rank_ends_the_world_instead_of_hanging():
    command = distributed.launch_command(2, ["-m", "tests.shared.training.ddp_job", "fail"])
    # Rank 1 waits in a collective rank 0 never joins: only rank 0's exit can end it.
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "WorldBroken: boom failed on rank 0: ValueError('only on rank 0')" in done.stderr
