"""Canonical JSON: the exact bytes that are signed.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Both sides re-encode the *received*
JSON value (never a re-dumped model) so that fields a newer peer adds are still covered by the signature;
a receiver given canonical bytes may check them as they came (envelope.signed_bytes_as_sent: the same bytes).
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` canonically (the form that is signed and hashed)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
