"""AIP-158 pagination: bounded page sizes and opaque page tokens.

A token encodes the last key of the previous page plus a fingerprint of the
request's filters, so a token cannot be replayed with different filters.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True, slots=True)
class PageRequest:
    size: int
    after: Any  # None for the first page


def _fingerprint(filters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def page_request(
    page_size: int, page_token: str, *, default: int, maximum: int, filters: dict[str, Any] | None = None
) -> PageRequest:
    if page_size < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    size = default if page_size == 0 else min(page_size, maximum)
    if not page_token:
        return PageRequest(size, None)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)))
        after, fingerprint = decoded["a"], decoded["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument([FieldViolation("page_token", "is not a token this method returned")]) from None
    if fingerprint != _fingerprint(filters or {}):
        raise InvalidArgument([FieldViolation("page_token", "was issued for different filters")])
    return PageRequest(size, after)


def next_page_token(last_key: Any, filters: dict[str, Any] | None = None) -> str:
    payload = json.dumps({"a": last_key, "f": _fingerprint(filters or {})}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
