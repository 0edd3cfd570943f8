"""Training and inference images/s of the image models on this machine.

    .venv/bin/python benchmarks/train.py [--batch 64] [--batches 3] [--sizes 64 128]

Synthetic tensors (no decoding), channels_last, fp32 on CPU / bf16 autocast on CUDA; plus
the decode+crop+normalize rate of the data pipeline on 512 px JPEGs, per process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.training.data import Augment, ImageTargets  # noqa: E402
from shared.vision import ModelConfig, autocast, build_model, pick_device  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = pick_device()
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    return (f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}; device {device}{gpu}")


def timed(fn, batches: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is
    the steadier figure; wall time tells what a run would see under the same load."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started


def bench_model(backbone: str, size: int, batch: int, batches: int,
                device: torch.device) -> list[float]:
    torch.manual_seed(0)
    name, _, stem = backbone.partition(":")
    config = ModelConfig(backbone=name, out_dim=32, image_size=size,
                         stem=stem or "small-image")
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randn(batch, 32, device=device)

    def train_step() -> None:
        with autocast(device):
            out = model(x)
        loss = (1 - torch.nn.functional.cosine_similarity(out.float(), y)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer_step() -> None:
        with autocast(device):
            model.embed(x)

    images = batch * batches
    model.train()
    train_wall, train_cpu = timed(train_step, batches, 1, device)
    model.eval()
    infer_wall, infer_cpu = timed(infer_step, batches, 1, device)
    return [images / train_wall, images / train_cpu, images / infer_wall, images / infer_cpu]


def bench_decode(size: int, count: int = 64) -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(count):
            path = Path(tmp) / f"{i}.jpg"
            pixels = rng.integers(0, 255, (512, 512, 3), np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(str(path))
        data = ImageTargets(paths, np.zeros((count, 1)), size, Augment())
        started = time.perf_counter()
        for i in range(count):
            data[i]
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--backbones", nargs="+",
                        default=["small", "resnet18", "resnet18:imagenet"],
                        help="resnet18 has the small-image stem; resnet18:imagenet the /4 one")
    args = parser.parse_args()
    device = pick_device()
    print(machine())
    print(f"batch {args.batch}, {args.batches} timed batches after 1 warm-up, channels_last; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'backbone':18} {'px':>4} {'train img/s':>12} {'img/cpu-s':>10} "
          f"{'infer img/s':>12} {'img/cpu-s':>10}")
    for backbone in args.backbones:
        for size in args.sizes:
            rates = bench_model(backbone, size, args.batch, args.batches, device)
            print(f"{backbone:18} {size:4d} {rates[0]:12.1f} {rates[1]:10.1f} "
                  f"{rates[2]:12.1f} {rates[3]:10.1f}", flush=True)
    for size in args.sizes:
        print(f"decode+crop 512px JPEG -> {size}px: {bench_decode(size):.0f} img/s "
              "per worker process")


if __name__ == "__main__":
    main()
