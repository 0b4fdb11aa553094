"""JSON files and texts read as what they must be: one JSON object, or a clear error.

A config, a manifest or a round's config.json may be missing, truncated,
not UTF-8 or not an object; each reader turns that into its own error type
(so callers catch one kind per file format) with the path and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path, error: type[Exception], missing: str) -> dict:
    """The JSON object in ``path``; ``error(text)`` if the file is absent
    (``text`` ends with ``missing``, what to do), not UTF-8, not JSON, or
    not an object."""
    if not path.is_file():
        raise error(f"{path}: missing; {missing}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    return parse_json_object(text, error, str(path))


def parse_json_object(text: str, error: type[Exception], where: str) -> dict:
    """The JSON object ``text`` holds; ``error`` naming ``where`` if it is
    not JSON or not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data
