"""Rows Milvus refuses for their data (a vector of the wrong length, NaN, a value out of
range), against the real Milvus: found by splitting the call, the others written."""

from __future__ import annotations

import pytest

from services.embedder import collections as mv
from shared import milvus as contract
from shared import retry
from tests.services.embedder.conftest import DIM, client


def row(project_id: int, **fields) -> dict:
    return {"project_id": project_id, "embedding": [0.1] * DIM, "model_version": 1,
            "owner_id": 7, "published_at": 1_750_000_000_000, "state_version": 1} | fields


def test_refused_rows_are_found_and_the_rest_written(esettings):
    milvus = mv.Milvus(esettings)
    name = f"{esettings.milvus_prefix}bisect"
    milvus.call(lambda c: c.create_collection(name, schema=contract.project_schema(DIM)))
    rows = [row(i) for i in range(30)]
    rows[3] = row(3, embedding=[0.1] * (DIM // 2))  # Milvus: "should divide the dim"
    rows[17] = row(17, embedding=[float("nan")] * DIM)  # Milvus: not a number
    rows[18] = row(18, owner_id="x")  # pymilvus: DataNotMatchException
    try:
        refused = mv.upsert(milvus, [name], rows, chunk=7)
        assert sorted(r["project_id"] for r, _ in refused) == [3, 17, 18]
        assert all(not retry.is_transient(error) for _, error in refused)
        c = client(esettings)
        c.create_index(name, contract.index_params(esettings))
        c.load_collection(name)
        found = c.query(name, filter="project_id >= 0", output_fields=["project_id"],
                        consistency_level="Strong")
        c.close()
        assert sorted(r["project_id"] for r in found) == sorted(set(range(30)) - {3, 17, 18})

        # A call every row fails alike is the system's fault, not the data's: raised.
        with pytest.raises(retry.SystemicFailure):
            mv.upsert(milvus, [name], [row(i, embedding=[0.5]) for i in range(10)], chunk=10)
    finally:
        milvus.call(lambda c: c.drop_collection(name))
        milvus.close()


def test_refused_rows_are_parked_at_once(esettings, db_url):
    import psycopg

    from services.embedder import failures as store
    from services.embedder.states import State
    from services.embedder.writer import Written
    from tests.services.embedder.conftest import failures, insert_projects

    insert_projects(db_url, [(1, 7, "/1.png"), (2, 7, "/2.png")])
    with psycopg.connect(db_url) as conn:
        versions = dict(conn.execute("SELECT project_id, state_version FROM projects"))
    states = {pid: State(pid, True, 7, 1_750_000_000_000, f"/{pid}.png", versions[pid])
              for pid in (1, 2)}
    written = Written(failed={1: (states[1], "milvus refused: MilvusException: NaN"),
                              2: (states[2], "not an image: cannot identify image file")},
                      refused={1})
    with psycopg.connect(db_url, autocommit=True) as conn:
        store.commit(conn, esettings, written, states, {("t", 0): 5})
    parked = failures(db_url)
    assert parked[1] == (esettings.embed_max_attempts, "milvus refused: MilvusException: NaN")
    assert parked[2][0] == 1  # an unreadable image is retried, not parked
