"""What metadata may be stored: JSON that can always be served back, checked where it comes in.

Metadata arrives from two places, ``POST /api/images`` and db.json, and is returned with every search result
that names its image. Whatever is stored must therefore serialise as UTF-8 JSON later, on every answer: a lone
UTF-16 surrogate (``"\\ud800"``), NaN, a 5,000-digit integer or a 300-deep nest would be stored fine and then
break each search that shows it. So every string (keys included) must be valid UTF-8 text, integers fit in 64
bits, floats are finite, nesting is shallow, and the size is counted in the UTF-8 bytes it is stored as.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pictrace.errors import InvalidInputError

# Deep enough for any real record (a title, tags, a nested author), shallow enough that nothing downstream
# (json, pydantic, Jinja) comes near a recursion limit.
MAX_DEPTH = 16
_INT_BOUND = 1 << 63


class MetadataError(InvalidInputError):
    """Metadata that could be stored but not always served back (or that is too large)."""


def check_text(value: str, where: str) -> None:
    """UTF-8 text only: a lone surrogate has no UTF-8 form, so no answer that contains it can be written."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError(f"{where} is not valid text (a lone UTF-16 surrogate)") from None


def _check(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MetadataError(f"metadata is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, int):
        if not -_INT_BOUND <= value < _INT_BOUND:
            raise MetadataError(f"{where} is an integer outside 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MetadataError(f"{where} is not a finite number")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MetadataError(f"{where} has a key that is not text")
            check_text(key, f"a key of {where}")
            _check(item, f"{where}.{key}", depth + 1)
    else:
        raise MetadataError(f"{where} is a {type(value).__name__}, not JSON")


def check_metadata(value: Any, max_bytes: int | None, where: str = "metadata") -> dict[str, Any]:
    """``value`` if it is a JSON object that can always be served back and fits ``max_bytes`` of UTF-8 (None:
    the operator's own db.json, whose size is the operator's business)."""
    if not isinstance(value, dict):
        raise MetadataError(f"{where} must be a JSON object")
    _check(value, where, 1)
    if max_bytes is None:
        return value
    size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    if size > max_bytes:
        raise MetadataError(f"{where} is {size} bytes of UTF-8 JSON, more than the {max_bytes}-byte limit")
    return value


def parse_metadata(text: str, max_bytes: int) -> dict[str, Any]:
    """Metadata sent as JSON text (a form field), parsed then checked. Before parsing, the text may be at most
    six times the limit: ``\\uXXXX`` escapes spell one character in six bytes, and the limit is on what is stored."""
    if len(text) > 6 * max_bytes:
        raise MetadataError(f"metadata is larger than the {max_bytes}-byte limit")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata must be a JSON object: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, a 5,000-deep nest
        raise MetadataError(f"metadata cannot be read: {exc}") from exc
    return check_metadata(value, max_bytes)
