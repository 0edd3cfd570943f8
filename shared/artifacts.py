"""Model artifacts under `COFEAT_DATA_DIR/models/<kind>/v<id>/`, written atomically.

A version directory is built under a temporary name and renamed into place, so readers
never see a half-written version and a crashed run leaves only a `.tmp-*` directory that
the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def models_dir(data_dir: Path, kind: str) -> Path:
    return Path(data_dir) / "models" / kind


def version_dir(data_dir: Path, kind: str, version_id: int) -> Path:
    return models_dir(data_dir, kind) / f"v{version_id}"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            raise FileExistsError(f"artifact {final} already exists")
        os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(data_dir: Path, kind: str) -> int:
    """Delete leftovers of crashed writers; returns how many."""
    root = models_dir(data_dir, kind)
    stale = list(root.glob(".tmp-*")) if root.exists() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> object:
    return json.loads(Path(path).read_text())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
