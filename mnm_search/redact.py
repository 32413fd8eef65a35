"""Credentials never reach a file or a terminal: passwords in URLs are masked before writing.

Storage URLs such as `postgresql://user:secret@host/db` or `...?password=secret` are recorded
in `run.json`, printed in logs and quoted by database drivers in their errors. Every such text
goes through `redact` first. A password with an unencoded `@` or `:` is still masked whole,
and `url_secrets` lists the pieces a driver may quote on its own (e.g. `ss@host` of `p@ss@host`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

MASK = "***"

# Query keys whose values are credentials (libpq, SQLAlchemy and common HTTP conventions).
_SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key", "apikey")

# scheme://user:password@ : the password runs to the *last* `@` before the path, so an
# unencoded `@` inside it is masked too.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<password>[^/?#\s]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:" + "|".join(_SECRET_KEYS) + r")=)(?P<value>[^&;#\s'\"]*)", re.IGNORECASE
)


def url_secrets(url: str) -> list[str]:
    """The credential strings in URL (and their `@`/`:`-separated pieces), longest first."""
    found: list[str] = []
    for match in _USERINFO.finditer(url):
        found.append(match.group("password"))
    query = url.split("?", 1)[1] if "?" in url else ""
    for key, value in parse_qsl(query.replace(";", "&"), keep_blank_values=False):
        if key.lower() in _SECRET_KEYS:
            found.append(value)
    pieces = set()
    for secret in found:
        for candidate in (secret, unquote(secret), *re.split(r"[@:]", secret)):
            if len(candidate) >= 3:  # shorter pieces would mask ordinary words
                pieces.add(candidate)
    return sorted(pieces, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """TEXT with URL passwords, secret query values and the given SECRETS replaced by `***`."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{MASK}", text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text
