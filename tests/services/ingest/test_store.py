"""services/ingest/store.py: the session ingest writes with, against the real Postgres."""

from __future__ import annotations

import pytest

from services.ingest.store import STORE_TIMEOUT_S, Store
from shared.settings import Settings


@pytest.mark.parametrize("value", ["on", "off"])
def test_the_session_follows_the_synchronous_commit_setting(db_url, data_dir, value):
    settings = Settings(database_url=db_url, data_dir=data_dir,
                        ingest_synchronous_commit=value)
    store = Store(settings, "interactions", "projects", dead_letters=None)
    try:
        conn = store.db.get()
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == value
        # The bound on every statement is still there beside it.
        timeout = conn.execute("SELECT current_setting('statement_timeout')").fetchone()[0]
        assert timeout == f"{int(STORE_TIMEOUT_S // 60)}min"
    finally:
        store.close()


def test_an_unknown_value_is_a_settings_error(db_url):
    with pytest.raises(ValueError, match="ingest_synchronous_commit"):
        Settings(database_url=db_url, ingest_synchronous_commit="local")
