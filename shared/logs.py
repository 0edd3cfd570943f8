"""Structured logging: JSON lines when not on a terminal, readable text when on one."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from pythonjsonlogger.json import JsonFormatter

from shared.settings import Settings

_context: dict[str, object] = {}


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            setattr(record, key, value)
        return True


class _OncePerInterval(logging.Filter):
    """kafka-python logs every failed reconnect, several per second during an outage:
    let one of its records through per interval and count the rest."""

    def __init__(self, prefix: str, interval_s: float = 30.0):
        super().__init__()
        self.prefix, self.interval_s = prefix, interval_s
        self.last = -interval_s
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} similar messages suppressed)"
        self.last, self.suppressed = now, 0
        return True


def bind(**fields: object) -> None:
    """Fields (service, consumer group, model version) added to every later record."""
    _context.update(fields)


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Fields added to the records logged inside the block only (one refresh run, say)."""
    before = {key: _context[key] for key in fields if key in _context}
    _context.update(fields)
    try:
        yield
    finally:
        for key in fields:
            _context.pop(key, None)
        _context.update(before)


def setup_logging(settings: Settings, service: str) -> logging.Logger:
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_ContextFilter())
    handler.addFilter(_OncePerInterval("kafka"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(settings.log_level),
                                            logging.ERROR))
    bind(service=service)
    return logging.getLogger(f"cofeat.{service}")
