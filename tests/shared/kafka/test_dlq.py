"""Fitting a dead letter to the broker's size (the path against the broker is in
tests/services/ingest/test_hostile.py)."""

from shared.kafka import dlq
from shared.kafka.batch import Rejected


def letter(key, value, headers=()) -> Rejected:
    return Rejected("t", 3, 42, key, value, list(headers), "not_json: " + "x" * 5000)


def test_fits_whatever_the_record_holds():
    limit = 100_000
    cases = [letter(b"k" * 2_000_000, b"v" * 10, [("h", b"1")]),  # the key alone too big
             letter(b"k", b"v" * 2_000_000, [("h", b"x" * 50_000)] * 3),
             letter(None, None, [("null", None), ("cofeat.error.reason", b"forged")]),
             letter(b"k", b"v" * (limit - 2_000))]  # close to the limit
    for case in cases:
        key, value, headers = dlq.fit(case, limit)
        assert dlq.size(key, value, headers) <= limit
        names = dict(headers)
        assert names[dlq.REASON].startswith(b"not_json") and len(names[dlq.REASON]) <= 1000
        assert (names[dlq.SOURCE_TOPIC], names[dlq.SOURCE_PARTITION],
                names[dlq.SOURCE_OFFSET]) == (b"t", b"3", b"42")
        assert [k for k, _ in headers].count(dlq.REASON) == 1
    key, value, headers = dlq.fit(cases[0], limit)
    assert key == b"k" * 1024 and value == b"v" * 10
    assert dict(headers)[dlq.TRUNCATED] == b"headers=1 key=2000000"
    key, value, headers = dlq.fit(cases[1], limit)
    assert dict(headers)[dlq.TRUNCATED] == b"headers=3 value=2000000" and key == b"k"
    assert value == b"v" * len(value) and len(value) > limit - 2_000
    key, value, headers = dlq.fit(cases[2], limit)
    assert (key, value) == (None, b"") and ("null", b"") in headers
    assert dlq.TRUNCATED not in dict(headers)
    assert dlq.minimal(cases[1])[2][-1] == (dlq.TRUNCATED,
                                           b"value=2000000 key=1 headers=3")
