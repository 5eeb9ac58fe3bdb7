"""Credentials out of everything we store or print (docs/RELIABILITY.md, "Credentials").

A tracking URI may carry a user and password (`http://user:pw@host:5000`, also
`postgresql://user:pw@host/db`). The process that connects keeps the real URI in memory;
every place that writes a file, an MLflow param or tag, or a line for a person passes its
text through `redact` first, which replaces the user info of every URI in it by `***`.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# scheme://userinfo@ : the user info runs to the last "@" before the host's end ("/", "?", "#"
# or whitespace), so a password holding an unescaped "@" is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_text(text: str) -> str:
    """`text` with the user info of every URI in it replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def redact(obj: Any) -> Any:
    """The same value with every string in it (nested dicts, lists, tuples) redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def is_redacted(uri: str | None) -> bool:
    """True for a URI whose credentials were taken out by `redact` (it cannot connect as is)."""
    return bool(uri) and f"://{REDACTED}@" in uri
