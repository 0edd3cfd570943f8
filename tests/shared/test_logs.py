import io
import json
import logging

import pytest

from shared import logs
from shared.logs import bind, bound, setup_logging
from shared.settings import Settings


@pytest.fixture
def json_log(tmp_path):
    root = logging.getLogger()
    handlers, level, context = root.handlers[:], root.level, dict(logs._context)
    setup_logging(Settings(log_format="json", data_dir=tmp_path), "refresh")
    out = io.StringIO()
    root.handlers[0].setStream(out)
    log = logging.getLogger("cofeat.refresh")

    def lines() -> list[dict]:
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield log, lines
    root.handlers[:], root.level = handlers, level
    logs._context.clear()
    logs._context.update(context)


def test_records_are_json_with_service_and_bound_fields(json_log) -> None:
    log, lines = json_log
    bind(consumer_group="ingest-a")
    log.info("hello %s", "world")
    (record,) = lines()
    assert record["message"] == "hello world"
    assert record["level"] == "INFO"
    assert record["service"] == "refresh"
    assert record["consumer_group"] == "ingest-a"


def test_bound_fields_last_only_for_the_block(json_log) -> None:
    log, lines = json_log
    bind(model_version=3)
    with bound(model_version=7, factor_version=5):
        log.info("inside")
    log.info("after")
    inside, after = lines()
    assert (inside["model_version"], inside["factor_version"]) == (7, 5)
    assert after["model_version"] == 3
    assert "factor_version" not in after


def test_bound_restores_on_error(json_log) -> None:
    log, lines = json_log
    with pytest.raises(RuntimeError), bound(factor_version=9):
        raise RuntimeError("fit failed")
    log.info("after")
    assert "factor_version" not in lines()[0]
