"""The operator's logging: `JsonFormatter` (one JSON object per line) and `setup_logging`.

Each line carries time, level, logger and message, plus the object it is about: kopf's
`k8s_ref`, or the `job`, `stage` and `child` passed as `extra`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the object it is about."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, Mapping) and ref.get("name"):
            entry["object"] = f"{ref.get('namespace', '')}/{ref['name']}".lstrip("/")
        for field in ("job", "stage", "child"):
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kopf reports every watch event at debug level and each handler run at info: only its
    # warnings, unless everything is asked for.
    if root.level > logging.DEBUG:
        logging.getLogger("kopf").setLevel(max(logging.WARNING, root.level))
