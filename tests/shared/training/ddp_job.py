"""Run by test_distributed.py under torchrun (every rank runs this module):
`python -m tests.shared.training.ddp_job WORLD_DIR OUT_DIR`, or `... fail`.

WORLD_DIR holds world.npz (paths, factors) written by the test. Rank 0 writes
OUT_DIR/report.json with what the test checks; followers record every file they open
for writing, or directory they make, under OUT_DIR (they should make none). `fail`: the
leader hands out a job that fails on rank 0 alone, while rank 1 waits in a collective.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from shared.training import distributed
from shared.training.data import ImageTargets
from shared.training.targets import make_targets
from shared.training.train import Split, TrainConfig, fine_tune, predict, train
from shared.vision import ModelConfig

MODEL = ModelConfig(backbone="small", out_dim=8, image_size=32)
CONFIG = TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_steps=2, num_workers=0)


class Interrupt(Exception):
    pass


def stop_at(epoch: int, step: int):
    def hook(e, s, model):
        if (e, s) == (epoch, step):
            raise Interrupt
    return hook


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def watch_writes(root: Path, seen: list[str]) -> None:
    def hook(event, args):
        if event not in ("open", "os.mkdir") or not isinstance(args[0], (str, Path)) or \
                not str(args[0]).startswith(str(root)):
            return
        if event == "os.mkdir":
            seen.append(str(args[0]))
        elif (args[1] and any(c in args[1] for c in "wax+")) or (args[2] and args[2] & 0o3):
            seen.append(str(args[0]))  # opened for writing, by mode or by flags
    sys.addaudithook(hook)


def main(world_dir: Path, out: Path) -> None:
    world = distributed.join()
    assert world is not None and world.size == 2, world
    writes: list[str] = []
    if not world.leader:
        watch_writes(out, writes)
    saved = np.load(world_dir / "world.npz")
    paths = [str(p) for p in saved["paths"]]
    targets = make_targets(saved["factors"]).values
    train_split = Split(paths[:64], targets[:64])
    val_split = Split(paths[64:80], targets[64:80])

    # Every rank calls train itself here, so that an interruption (raised on every rank
    # at the same step) leaves the world usable for the resumed run.
    whole = train(MODEL, train_split, val_split, CONFIG, out / "whole", world=world)
    try:
        train(MODEL, train_split, val_split, CONFIG, out / "split",
              on_step=stop_at(1, 2), world=world)
        raise AssertionError("not interrupted")
    except Interrupt:
        pass
    checkpoints = sorted(p.name for p in (out / "split" / "checkpoints").iterdir())
    resumed = train(MODEL, train_split, val_split, CONFIG, out / "split", world=world)
    changed = np.arange(64) < 8  # over-sampled: every rank deals out the same weighted draws
    tuned = fine_tune(out / "whole" / "model.pt", train_split, val_split, changed,
                      CONFIG, out / "tuned", world=world)
    data = ImageTargets(val_split.paths, val_split.targets, MODEL.image_size)
    sharded, _ = predict(whole.model, data, CONFIG, torch.device("cpu"), world=world)
    ranks = distributed.gather(world, {"whole": digest(whole.model),
                                       "resumed": digest(resumed.model),
                                       "tuned": digest(tuned.model),
                                       "writes": writes,
                                       "history": whole.history})
    if not world.leader:
        distributed.follow(world)  # the jobs protocol: the leader hands out one train call
        return
    single, _ = predict(whole.model, data, CONFIG, torch.device("cpu"))
    job = distributed.call(train, MODEL, train_split, val_split, CONFIG, out / "job")
    distributed.close(world)
    report = {"ranks": ranks, "job": digest(job.model), "checkpoints_at_interrupt": checkpoints,
              "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
              "predict_max_diff": float((sharded - single).abs().max()),
              "predict_rows": [len(sharded), len(single)],
              "history": whole.history, "resumed_history": resumed.history}
    (out / "report.json").write_text(json.dumps(report, indent=1))


def boom(world: distributed.World) -> None:
    if world.leader:
        raise ValueError("only on rank 0")
    distributed.gather(world, "waiting for rank 0")  # which never comes


def fail() -> None:
    world = distributed.join()
    if world.leader:
        distributed.call(boom)
    else:
        distributed.follow(world)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "fail":
        fail()
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
