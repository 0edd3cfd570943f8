import numpy as np

from services.simulate import stats
from services.simulate.behaviour import APPRECIATE, COMMENT, PUBLISHED, VIEW, generate
from shared import events
from shared.topics import INTERACTIONS, PROJECTS


def test_same_seed_same_events(tiny_world, tiny_chunks):
    again = list(generate(tiny_world))
    for a, b in zip(tiny_chunks, again, strict=True):
        assert np.array_equal(a.ts, b.ts) and np.array_equal(a.project, b.project)
        assert np.array_equal(a.user, b.user) and np.array_equal(a.kind, b.kind)


def test_event_volume_and_mix(tiny_world, tiny_chunks):
    kinds = np.bincount(np.concatenate([c.kind for c in tiny_chunks]), minlength=3)
    assert abs(kinds.sum() - tiny_world.config.events) < 0.03 * tiny_world.config.events
    # Views dominate; appreciations are rarer, comments rarer still (Behance: ~17%).
    assert kinds[VIEW] > 3 * kinds[APPRECIATE] > 3 * kinds[COMMENT] > 0


def test_every_record_follows_the_contract(tiny_records):
    interactions = projects = 0
    for topic, key, value in tiny_records:
        if topic == INTERACTIONS:
            event = events.parse_interaction(value)
            assert key == str(event.user_id).encode()
            interactions += 1
        else:
            assert topic == PROJECTS
            event = events.parse_project(value)
            assert key == str(event.project_id).encode()
            assert event.image_uri.startswith("/data/images/")
            projects += 1
    assert interactions > 10_000 and projects >= 500


def test_time_order_publication_first_and_cold_start(tiny_world, tiny_records):
    published, deleted, last_ts, interacted = {}, {}, 0, set()
    for topic, _key, value in tiny_records:
        event = (events.parse_interaction(value) if topic == INTERACTIONS
                 else events.parse_project(value))
        assert event.ts_ms >= last_ts
        last_ts = event.ts_ms
        if topic == PROJECTS:
            if event.type == "published":
                published[event.project_id] = event.ts_ms
            elif event.type == "deleted":
                deleted[event.project_id] = event.ts_ms
            continue
        assert event.project_id in published  # published before any interaction
        assert event.project_id not in deleted  # none after deletion
        assert 1 <= event.user_id <= tiny_world.config.users
        interacted.add(event.project_id)
    assert len(published) == tiny_world.config.projects
    assert deleted and any(t == "updated" for t in _project_types(tiny_records))
    # Projects published in the last slice of time have no interactions: cold start.
    cold = set(published) - interacted
    newest = sorted(published, key=published.get)[-10:]
    assert set(newest) <= cold


def _project_types(records):
    return [events.parse_project(v).type for t, _k, v in records if t == PROJECTS]


def test_project_events_kinds(tiny_chunks):
    kinds = np.concatenate([c.project_kind for c in tiny_chunks])
    assert (kinds == PUBLISHED).sum() == 500


def test_style_dominates_taste_but_category_counts(tiny_world, tiny_chunks):
    signal = stats.taste_signal(tiny_world, stats.collect(tiny_chunks))
    assert signal["style"]["lift"] > 3
    assert 1.05 < signal["category"]["lift"] < signal["style"]["lift"]
    assert signal["style"]["auc"] > signal["category"]["auc"] > 0.5
    # Not trivial either: plenty of appreciations land outside the liked styles.
    assert signal["style"]["rate_other"] > 0.03


def test_popularity_filtering_matters(tiny_world, tiny_chunks):
    report = stats.density_report(tiny_world, stats.collect(tiny_chunks), 5, 0.5)
    assert report["filter"]["users"] < tiny_world.config.users
    assert report["filter"]["projects"] < 0.5 * tiny_world.config.projects
    for name in ("appreciations", "views"):
        assert report[name]["filtered_pct"] > report[name]["raw_pct"]
        assert 0.2 < report[name]["kept_share"] < 0.95
