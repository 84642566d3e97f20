"""The one way a versioned JSON record from another process or a disk is opened."""

from __future__ import annotations

import json
from typing import Any


def open_record(raw: bytes | bytearray | memoryview, version: int, what: str,
                error: type[Exception]) -> dict[str, Any]:  # fmt: skip
    """``raw`` as a JSON object whose ``version`` is ``version``; else ``error`` (one line,
    naming ``what``)."""
    try:
        record = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{what} is not JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("version") != version:
        found = record.get("version") if isinstance(record, dict) else None
        raise error(f"{what}: version {found!r} is not {version}")
    return record
