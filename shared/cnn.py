"""CNN model versions as the embedder and the query API read them.

A CNN version is a `model_versions` row with kind 'cnn' (its `factor_version_id` names the
factor version it learned from) plus a directory `COFEAT_DATA_DIR/<artifact>` (normally
`models/cnn/v<id>/`) holding:

    model.pt    shared.vision.save_model's file: state_dict + ModelConfig + extra
    meta.json   version, parent, factor version, training parameters and metrics
    loss.png    the loss curve

The live model is the promoted one with the highest id.
"""

from __future__ import annotations

from pathlib import Path

from shared.artifacts import read_json
from shared.factors import _query

MODEL_FILE = "model.pt"
_COLUMNS = ("id, kind, parent_id, factor_version_id, params, stats, metrics, artifact, "
            "status, created_at")
_CURRENT = (f"SELECT {_COLUMNS} FROM model_versions WHERE kind = 'cnn' "
            "AND status = 'promoted' ORDER BY id DESC LIMIT 1")
_BY_ID = f"SELECT {_COLUMNS} FROM model_versions WHERE kind = 'cnn' AND id = %(id)s"


def current_cnn_version(conn_or_engine) -> dict | None:
    """The promoted CNN version with the highest id, as a dict of its row, or None."""
    return _query(conn_or_engine, _CURRENT)


def cnn_version(conn_or_engine, version_id: int) -> dict | None:
    return _query(conn_or_engine, _BY_ID, {"id": version_id})


def model_path(data_dir: Path, version_row: dict) -> Path:
    return Path(data_dir) / version_row["artifact"] / MODEL_FILE


def load_cnn(data_dir: Path, version_row: dict, device=None):
    """(model in eval mode, meta) of a CNN version row."""
    from shared.vision import load_model

    model, _extra = load_model(model_path(data_dir, version_row), device)
    meta = read_json(Path(data_dir) / version_row["artifact"] / "meta.json")
    if meta.get("version") != version_row["id"]:
        raise ValueError(f"artifact {version_row['artifact']} belongs to version "
                         f"{meta.get('version')}, not {version_row['id']}")
    return model, meta
