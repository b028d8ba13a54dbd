"""Secret scrubbing for everything ``mimcli push`` publishes: values under token/password-like
keys, Hub tokens (``hf_...``), secret-looking flags and assignments, URL credentials and query
strings, and any literal secret the caller knows (the login token) become ``<redacted>``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"

# dict keys whose (scalar) values are secrets
SECRET_KEY = re.compile(
    r"token|secret|passw|^pass$|api[_-]?key|_key$|^key$|auth|credential|signature", re.I
)
# a Hugging Face token anywhere in a string
TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_SECRET_WORDS = r"(?:token|secret|passw\w*|pass|key|auth\w*|credential\w*|signature)"
# ``--hub-token VALUE`` / ``--hub-token=VALUE``
SECRET_FLAG = re.compile(rf"(--[\w-]*{_SECRET_WORDS}[\w-]*[ =])\S+", re.I)
# ``HF_TOKEN=VALUE``, ``password=VALUE`` (up to whitespace, &, ; or ,)
SECRET_ASSIGN = re.compile(rf"(\b[\w-]*{_SECRET_WORDS}[\w-]*=)[^\s&;,]+", re.I)
# ``scheme://user:password@host``
URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.I)
# ``scheme://host/path?query`` (signed URLs carry their credentials in the query)
URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#]+)\?[^\s#]*", re.I)


def scrub(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` without secrets.

    Args:
        obj: JSON-like data (dicts, lists, tuples, strings, scalars).
        secrets: literal strings to remove wherever they appear (empty ones are ignored).

    Returns:
        The same structure (tuples become lists) where scalar values under token/password-like
        keys, Hub tokens (``hf_...``), secret flags/assignments, URL credentials and query
        strings, and any of ``secrets`` are replaced by ``<redacted>``.
    """
    secrets = [s for s in secrets if s]
    if isinstance(obj, dict):
        return {
            k: REDACTED
            if SECRET_KEY.search(str(k)) and v is not None and not isinstance(v, dict | list)
            else scrub(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        obj = SECRET_FLAG.sub(r"\1" + REDACTED, obj)
        obj = SECRET_ASSIGN.sub(r"\1" + REDACTED, obj)
        obj = URL_USERINFO.sub(r"\1" + REDACTED + "@", obj)
        obj = URL_QUERY.sub(r"\1?" + REDACTED, obj)
        return TOKEN_VALUE.sub(REDACTED, obj)
    return obj


def scrub_literals(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and any Hub token (``hf_...``) replaced by
    ``<redacted>``; nothing else is touched (so code such as ``return_prefix_tokens=True``
    survives)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return TOKEN_VALUE.sub(REDACTED, text)
