import psycopg

from shared.db.store import load_offsets, write_batch
from shared.events import Interaction, InteractionType, ProjectEvent

T0 = 1_700_000_000_000


def _interaction(n: int, user: int = 1, project: int = 10) -> Interaction:
    return Interaction(f"i{n}", InteractionType.view, user, project, T0 + n)


def _project(event_id: str, kind: str, project: int, ts: int, uri: str = "/img.png"):
    return ProjectEvent(event_id, kind, project, 7, uri, ts)


def _rows(conn, sql):
    return conn.execute(sql).fetchall()


def test_batch_is_idempotent_and_keeps_order(db_url):
    with psycopg.connect(db_url) as conn:
        batch = [_interaction(n) for n in range(5)] + [_interaction(2)]
        first = write_batch(conn, batch, [], "g", {("t", 0): 6})
        again = write_batch(conn, batch, [], "g", {("t", 0): 6})
        assert (first.interactions_new, again.interactions_new) == (5, 0)
        ids = [r[0] for r in _rows(conn, "SELECT event_id FROM interactions ORDER BY seq")]
        assert ids == [f"i{n}" for n in range(5)]


def test_offsets_follow_the_last_stored_batch(db_url):
    with psycopg.connect(db_url) as conn:
        write_batch(conn, [], [], "g", {("t", 0): 10, ("t", 1): 3})
        write_batch(conn, [], [], "g", {("t", 0): 4})
        assert load_offsets(conn, "g", [("t", 0), ("t", 1), ("t", 2)]) == {
            ("t", 0): 4, ("t", 1): 3}
        assert load_offsets(conn, "other", [("t", 0)]) == {}


def test_project_state_follows_newest_event(db_url):
    with psycopg.connect(db_url) as conn:
        write_batch(conn, [], [_project("p1", "published", 5, T0),
                               _project("p2", "updated", 5, T0 + 10, "/new.png")], "g", {})
        # A late replay of the old publish must not resurrect the old image.
        write_batch(conn, [], [_project("p3", "deleted", 5, T0 + 20),
                               _project("p1", "published", 5, T0)], "g", {})
        state = _rows(conn, "SELECT status, image_uri, last_event_id FROM projects")
        assert state == [("deleted", "/new.png", "p3")]
        assert _rows(conn, "SELECT count(*) FROM project_events") == [(3,)]
        owners = _rows(conn, "SELECT event_id, user_id, project_id, type FROM interactions")
        assert owners == [("own:p1", 7, 5, int(InteractionType.own))]


def test_text_fields_with_control_characters_round_trip(db_url):
    odd = "a\tb\\c\nd"
    with psycopg.connect(db_url) as conn:
        write_batch(conn, [Interaction(odd, InteractionType.comment, 1, 2, T0)],
                    [_project("p", "published", 3, T0, "/x\ty.png")], "g", {})
        assert _rows(conn, "SELECT event_id FROM interactions WHERE type = 2") == [(odd,)]
        assert _rows(conn, "SELECT image_uri FROM projects") == [("/x\ty.png",)]
