"""`configure_logging`: one handler on the root logger, text or JSON lines.

Both the API server (`peftreg serve`) and job workers (`peftreg worker`)
call it once at start-up. Every record carries `request_id` while a request
is being served (from `peftreg.registry.context`), so a line can be matched to the
`X-Request-Id` a user quotes.

JSON lines hold `time` (ISO 8601, UTC), `level`, `logger`, `message`, the
`request_id` when there is one, any `extra=` fields, and `exc_info` for
exceptions. Text lines are for people: `time level logger [request id] message`.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from peftreg.registry.context import current_request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to records that do not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request_id = current_request_id()
            if request_id is not None:
                record.request_id = request_id
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


def json_formatter() -> logging.Formatter:
    formatter: logging.Formatter = JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        # uvicorn's ANSI-coloured copy of the message; our text formatter's helper field.
        reserved_attrs=[*RESERVED_ATTRS, "color_message", "request_tag"],
    )
    return formatter


class _PeftregHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler `configure_logging` installed, so a second call replaces it."""


def configure_logging(
    format: LogFormat = "text",
    level: str | int = "INFO",
    *,
    stream: IO[str] | None = None,
) -> None:
    """Send every log record (uvicorn's included) to `stream` (stderr) in `format`."""
    if format not in ("text", "json"):
        raise ValueError(f"unknown log format {format!r}; use 'text' or 'json'")
    handler = _PeftregHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(json_formatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _PeftregHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
