"""Factor versions as other services read them (format: docs/factors.md).

A factor version is a `model_versions` row with kind 'factors' plus a directory
`COFEAT_DATA_DIR/<artifact>` (normally `models/factors/v<id>/`) holding:

    item_factors.npy  float32 [n_items, k]  row r is project item_ids[r]
    user_factors.npy  float32 [n_users, k]  row r is user user_ids[r]
    item_ids.npy      int64 [n_items]       project ids, ascending
    user_ids.npy      int64 [n_users]       user ids, ascending
    meta.json         version, parent, mode, shapes, snapshot, watermark, params

The current version is the promoted one with the highest id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.artifacts import read_json, write_json

FORMAT_VERSION = 1
ARRAYS = ("item_factors", "user_factors", "item_ids", "user_ids")

_COLUMNS = ("id, kind, parent_id, watermark, params, stats, metrics, artifact, status, "
            "created_at")
_CURRENT = (f"SELECT {_COLUMNS} FROM model_versions WHERE kind = 'factors' "
            "AND status = 'promoted' ORDER BY id DESC LIMIT 1")
_BY_ID = f"SELECT {_COLUMNS} FROM model_versions WHERE kind = 'factors' AND id = %(id)s"


@dataclass
class Factors:
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    meta: dict

    def item_rows(self, project_ids) -> np.ndarray:
        """Row of each project id in item_factors, -1 where the version has none."""
        return _rows(self.item_ids, np.asarray(project_ids, dtype=np.int64))

    def user_rows(self, user_ids) -> np.ndarray:
        return _rows(self.user_ids, np.asarray(user_ids, dtype=np.int64))


def _rows(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(ids, wanted)
    ok = pos < len(ids)
    ok[ok] &= ids[pos[ok]] == wanted[ok]
    return np.where(ok, pos, -1)


def _query(conn_or_engine, statement: str, params: dict | None = None) -> dict | None:
    """One row as a dict, from a SQLAlchemy engine/connection or a psycopg connection."""
    if hasattr(conn_or_engine, "pgconn"):  # psycopg
        with conn_or_engine.cursor() as cur:
            cur.execute(statement, params)
            row = cur.fetchone()
            names = [column.name for column in cur.description] if row else []
        return dict(zip(names, row, strict=True)) if row else None
    from sqlalchemy import text

    sa_statement = text(statement.replace("%(id)s", ":id"))
    if hasattr(conn_or_engine, "connect") and not hasattr(conn_or_engine, "execute"):
        with conn_or_engine.connect() as conn:
            row = conn.execute(sa_statement, params or {}).mappings().first()
    else:
        row = conn_or_engine.execute(sa_statement, params or {}).mappings().first()
    return dict(row) if row else None


def current_factor_version(conn_or_engine) -> dict | None:
    """The promoted factor version with the highest id, as a dict of its row, or None."""
    return _query(conn_or_engine, _CURRENT)


def factor_version(conn_or_engine, version_id: int) -> dict | None:
    return _query(conn_or_engine, _BY_ID, {"id": version_id})


def load_factors(data_dir: Path, version_row: dict, mmap: bool = False) -> Factors:
    """The arrays of a version row (from current_factor_version or factor_version)."""
    directory = Path(data_dir) / version_row["artifact"]
    mode = "r" if mmap else None
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode=mode) for name in ARRAYS}
    meta = read_json(directory / "meta.json")
    factors = Factors(meta=meta, **arrays)
    _check(factors, version_row)
    return factors


def _check(factors: Factors, version_row: dict) -> None:
    if factors.meta.get("version") != version_row["id"]:
        raise ValueError(f"artifact {version_row['artifact']} belongs to version "
                         f"{factors.meta.get('version')}, not {version_row['id']}")
    if (factors.item_factors.shape[0] != len(factors.item_ids)
            or factors.user_factors.shape[0] != len(factors.user_ids)
            or factors.item_factors.shape[1] != factors.user_factors.shape[1]):
        raise ValueError(f"artifact {version_row['artifact']} has inconsistent shapes")


def write_factors(directory: Path, factors: Factors) -> None:
    """Write a version's files into `directory` (an atomic_dir being built)."""
    arrays = {"item_factors": np.asarray(factors.item_factors, dtype=np.float32),
              "user_factors": np.asarray(factors.user_factors, dtype=np.float32),
              "item_ids": np.asarray(factors.item_ids, dtype=np.int64),
              "user_ids": np.asarray(factors.user_ids, dtype=np.int64)}
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", np.ascontiguousarray(array))
    meta = {**factors.meta, "format": FORMAT_VERSION,
            "n_items": len(arrays["item_ids"]), "n_users": len(arrays["user_ids"]),
            "k": int(arrays["item_factors"].shape[1]), "dtype": "float32"}
    write_json(directory / "meta.json", meta)
