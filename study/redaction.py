"""Credentials out of URIs: what may be printed, written to ``config.yaml`` or logged to MLflow.

Imports neither MLflow nor the study schema, so the schema (``study.config``) and the tracking
(``study.tracking``) share one rule.
"""

from __future__ import annotations

import re

REDACTED = "***"  # what replaces a credential; a value holding it is not the real one
# query parameters that carry a credential (``?password=…``, ``?token=…``, ``?sslpassword=…``)
_SECRET_QUERY_KEY = re.compile(r"pass|pwd|secret|token|api_?key|access_?key|auth|credential|signature", re.I)


def redact(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***``: the password of the user-info part
    (``postgresql://user:***@host:5432/db``; a user-info without a password, which may be a token,
    becomes ``***@host``) and the values of query parameters such as ``password`` or ``token``.
    A value without credentials (``sqlite:///x.db``, ``http://127.0.0.1:5000``, a path) is returned
    unchanged. Reserved characters in a credential must be percent-encoded, as RFC 3986 and
    SQLAlchemy's URLs require."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{REDACTED}@{host}" if colon and user else f"{REDACTED}@{host}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_redact_parameter(p) for p in query.split("&")) + hash_ + fragment
    return f"{scheme}://{authority}{path}{question}{query}"


def _redact_parameter(parameter: str) -> str:
    key, equals, value = parameter.partition("=")
    return f"{key}={REDACTED}" if equals and value and _SECRET_QUERY_KEY.search(key) else parameter


def is_redacted(value: str) -> bool:
    """Whether ``value`` went through :func:`redact` and lost a credential (it holds ``***``)."""
    return REDACTED in value


_CREDENTIALS_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"/?#@]*)@")


def redact_text(text: str) -> str:
    """``text`` (a message) with the user-info of every URI in it replaced by ``***``."""
    return _CREDENTIALS_IN_TEXT.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
