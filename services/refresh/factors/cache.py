"""The promoted version's pair sums and training choices, kept for the next refresh.

An incremental refresh starts from its parent's pairs and adds only the events the parent
did not see, instead of reading the whole store again; the parent's kept users and projects
and held-out pairs tell what changed. The cache is an optimisation, never the truth: it is
used only when it belongs to exactly the parent (id, snapshot, weights), and without it the
refresh reads the store and refits in full.

`COFEAT_DATA_DIR/cache/factors/pairs-v<id>/`: `.npy` arrays and `meta.json`, written under
a temporary name and renamed; the parent's and the newest are kept, older ones deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from services.refresh.factors.pairs import Pairs
from shared.artifacts import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)
FORMAT = 1
_NAME = re.compile(r"^pairs-v(\d+)$")
_ARRAYS = ("user_ids", "item_ids", "indptr", "indices", "data", "latest_item", "latest_seq",
           "kept_user_ids", "kept_item_ids", "held_user_ids", "held_item_ids")


@dataclass
class TrainingState:
    """What a version trained on, by id: kept users and projects, held-out pairs."""

    kept_user_ids: np.ndarray
    kept_item_ids: np.ndarray
    held_user_ids: np.ndarray
    held_item_ids: np.ndarray


@dataclass
class Cached:
    pairs: Pairs
    training: TrainingState


def root(data_dir: Path) -> Path:
    return Path(data_dir) / "cache" / "factors"


def save(data_dir: Path, version_id: int, pairs: Pairs, training: TrainingState,
         weights: Sequence[float], keep: int | None = None) -> Path:
    """Write the cache of `version_id`; remove all others but `keep`'s."""
    final = root(data_dir) / f"pairs-v{version_id}"
    shutil.rmtree(final, ignore_errors=True)  # a crashed earlier attempt of this id
    arrays = {"user_ids": pairs.user_ids, "item_ids": pairs.item_ids,
              "indptr": pairs.sums.indptr, "indices": pairs.sums.indices,
              "data": pairs.sums.data, "latest_item": pairs.latest_item,
              "latest_seq": pairs.latest_seq, **vars(training)}
    with atomic_dir(final) as tmp:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        write_json(tmp / "meta.json", {
            "format": FORMAT, "version": version_id, "snapshot": pairs.snapshot,
            "watermark": pairs.watermark, "weights": [float(w) for w in weights],
            "shape": list(pairs.shape)})
    for path in root(data_dir).iterdir():
        match = _NAME.match(path.name)
        if match and int(match[1]) not in (version_id, keep):
            shutil.rmtree(path, ignore_errors=True)
    return final


def load(data_dir: Path, version: dict, weights: Sequence[float]) -> Cached | None:
    """The cache of this version row, or None when absent, damaged or not its own."""
    path = root(data_dir) / f"pairs-v{version['id']}"
    try:
        meta = read_json(path / "meta.json")
        if (meta.get("format") != FORMAT or meta.get("snapshot") != version["stats"].get(
                "snapshot") or meta.get("weights") != [float(w) for w in weights]):
            log.info("pair cache of version %d does not match it; reading the store",
                     version["id"])
            return None
        arrays = {name: np.load(path / f"{name}.npy") for name in _ARRAYS}
        sums = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                             shape=tuple(meta["shape"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.info("no usable pair cache for version %d (%s)", version["id"], error)
        return None
    pairs = Pairs(arrays["user_ids"], arrays["item_ids"], sums, arrays["latest_item"],
                  arrays["latest_seq"], meta["snapshot"], int(meta["watermark"]))
    training = TrainingState(*(arrays[name] for name in (
        "kept_user_ids", "kept_item_ids", "held_user_ids", "held_item_ids")))
    return Cached(pairs, training)
