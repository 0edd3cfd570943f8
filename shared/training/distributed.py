"""Training and batch inference over several processes with torch.distributed.

One process per GPU (NCCL) or a few per CPU host (gloo), started by torchrun, which sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `launch` starts torchrun on
this machine for `--nproc N`, a cluster runs the same entry point under its own torchrun.

The leader (rank 0) alone talks to Postgres and writes files: checkpoints, the artifact,
the version row. It hands every piece of collective work (a training run, a sharded
inference) to the followers as a job - the function and its arguments, broadcast over a
gloo group - and every rank then runs that function with `world=` set. Followers read
what the job names (images, a parent model, a checkpoint the leader chose), so every node
must see COFEAT_DATA_DIR and the images at the same paths.

A job that fails on one rank leaves the others inside a collective, so a world does not
outlive a failed job: the leader raises WorldBroken, which the refresh loop does not catch
(it is no Exception), followers exit, and torchrun tears the world down (or restarts it,
with --max-restarts; the leader's checkpoints make that cheap).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

log = logging.getLogger(__name__)
Result = TypeVar("Result")

# Followers wait on the control group for the leader's next job: its preparation (reading
# factors, checking images) and, under --loop, a whole refresh interval. A leader that
# dies closes its sockets, which ends the wait at once.
CONTROL_TIMEOUT = timedelta(days=7)


class WorldBroken(BaseException):
    """A job failed while every rank was inside it. Not an Exception, so that loops which
    retry failed runs stop: the world must be started again, not reused."""


class World:
    """This process's place among the ranks of one torchrun job."""

    def __init__(self, rank: int, size: int, local_rank: int, device: torch.device,
                 control=None) -> None:
        self.rank, self.size, self.local_rank, self.device = rank, size, local_rank, device
        self.control = control  # gloo group for objects (jobs, gathers), long timeout
        self.state = "idle"  # idle | busy (inside a job) | broken | closed

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank {self.rank} of {self.size}, {self.device})"


_current: World | None = None


def launched() -> bool:
    """Whether torchrun (or another launcher using its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> World | None:
    """The world `join` made, or None in a single process."""
    return _current


def size() -> int:
    """Processes training together: 1 outside a world."""
    return 1 if _current is None else _current.size


def join() -> World | None:
    """Join the torchrun job this process belongs to; None when there is none or it has a
    single process (then nothing changes: no process group, no DDP)."""
    global _current
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes <= 1 or _current is not None:
        return _current
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                            world_size=processes)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _current = World(rank, processes, local_rank, device, control)
    log.info("joined %s (%s)", _current, dist.get_backend())
    return _current


def _device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but this node has "
                           f"{torch.cuda.device_count()} GPUs: start one process per GPU")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def launch_command(nproc: int, args: Sequence[str]) -> list[str]:
    """torchrun on this machine, `nproc` processes, each running `python <args>`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), *args]


def launch(nproc: int, args: Sequence[str]) -> NoReturn:
    """Replace this process with torchrun (signals then reach it and the ranks directly)."""
    env = dict(os.environ)
    # torchrun's own default is 1 thread per process, whatever the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    command = launch_command(nproc, args)
    os.execve(command[0], command, env)


# -- jobs ---------------------------------------------------------------------------


def call(fn: Callable[..., Result], *args, **kwargs) -> Result:
    """`fn(*args, **kwargs)` in a single process; in a world, the leader hands the call to
    every rank, which runs it with `world=` added, and returns its own result."""
    world = current()
    if world is None:
        return fn(*args, **kwargs)
    if not world.leader:
        raise RuntimeError("followers run the leader's jobs; they do not start their own")
    if world.state != "idle":
        raise WorldBroken(f"{world} is {world.state}")
    _broadcast(world, (fn, args, kwargs))
    world.state = "busy"
    try:
        result = fn(*args, world=world, **kwargs)
    except Exception as error:
        world.state = "broken"
        raise WorldBroken(f"{fn.__qualname__} failed on rank 0: {error!r}") from error
    world.state = "idle"
    return result


def follow(world: World) -> None:
    """A follower's life: run the leader's jobs until it closes the world. A job that
    raises ends this process (its peers cannot go on without it)."""
    while True:
        job = _broadcast(world, None)
        if job is None:
            break
        fn, args, kwargs = job
        log.info("rank %d: %s", world.rank, fn.__qualname__)
        fn(*args, world=world, **kwargs)
    world.state = "closed"
    dist.destroy_process_group()


def close(world: World | None) -> None:
    """The leader's end: followers waiting for a job are told to exit; after a failed job
    nobody listens, and torchrun ends them."""
    if world is None or world.state == "closed":
        return
    if world.leader and world.state == "idle":
        _broadcast(world, None)
    world.state = "closed"
    dist.destroy_process_group()


def _broadcast(world: World, obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


def broadcast(world: World | None, obj):
    """The leader's `obj` on every rank."""
    return obj if world is None else _broadcast(world, obj)


def gather(world: World, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=world.control)
    return out


# -- inside a training job --------------------------------------------------------------


def wrap(model: torch.nn.Module, world: World | None) -> torch.nn.Module:
    """The module gradients are averaged through; the model itself in a single process.
    DDP copies rank 0's weights and buffers to every rank here, and BatchNorm statistics
    follow rank 0's at every forward (they stay per-rank: SyncBatchNorm needs GPUs)."""
    if world is None:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def same_buffers(model: torch.nn.Module, world: World | None) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP copies them before each
    forward, so the last step leaves every rank its own; evaluation and the saved model
    must see one model."""
    if world is None:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def local_batch(batch_size: int, world: World | None) -> int:
    """Per-rank batch: the global batch stays the configured one, so the learning rate,
    the schedule and the result do not depend on the number of processes."""
    return batch_size if world is None else math.ceil(batch_size / world.size)


class ShardSampler(Sampler[int]):
    """This rank's share of an epoch's draws. `sampler` is seeded alike on every rank, so
    all ranks see the same draws - the ones a single process would train on - and torch's
    DistributedSampler deals them out: rank r gets draws r, r+W, r+2W, ..., padded by
    repeating the first draws so that every rank runs the same number of steps (DDP
    needs that)."""

    def __init__(self, sampler: Sampler[int], world: World) -> None:
        self.draws = list(sampler)
        self.positions = DistributedSampler(self.draws, num_replicas=world.size,
                                            rank=world.rank, shuffle=False)

    def __iter__(self):
        return (self.draws[position] for position in self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def inference_shard(n: int, world: World) -> range:
    """Samples r, r+W, ... for inference: no padding, nothing waits on a step."""
    return range(world.rank, n, world.size)


def everyone(world: World | None, flag: bool) -> bool:
    """Whether `flag` holds on every rank (a step is taken by all ranks or by none)."""
    if world is None:
        return flag
    value = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def total(world: World | None, *values: float) -> list[float]:
    """Sums over ranks."""
    if world is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def union(world: World | None, items: set) -> set:
    if world is None:
        return set(items)
    return set().union(*gather(world, set(items)))
