"""Files written whole or not at all: the lowest layer every other package (data, runs, tasks, report) may use.

A reader in another process (a report, `compare`, a resumed run) sees the old file or the new one, never half of it,
also after a crash of the machine (fsync before the rename).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """The old text or the new, never half of it."""
    tmp = _temporary(path)
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    """rows -> CSV (header from the first row's keys), renamed into place so a reader never sees half a table."""
    tmp = _temporary(path)
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonable(obj: Any) -> Any:
    """numpy scalars / arrays -> plain numbers and lists; NaN and infinities -> null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(jsonable(obj), indent=2))
