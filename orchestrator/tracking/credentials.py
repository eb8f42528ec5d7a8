"""Credentials never travel inside a URI past the point where it is read.

A tracking or storage URI may carry them (`http://user:password@host:5000`, `...?token=...`). Everything the
project prints, logs as an MLflow param or writes into a config artifact goes through `redact_uri` (or
`redact_tree` for a whole resolved config), which drops the userinfo and the values of secret-looking query
parameters. `credentials_to_environment` is the one place where tracking credentials found in a URI are
moved into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: MLflow's client reads them from there, the
Ray processes started afterwards inherit them, and the URI that is stored in configs has none.
"""
from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"

# Query parameters whose values are secrets (pre-signed S3 URLs, API tokens, SAS signatures, ...).
_SECRET_QUERY = re.compile(r"token|secret|passw|pwd|key|signature|credential|auth|sig$|session", re.IGNORECASE)
_HIERARCHICAL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REDACTED = "REDACTED"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, username, password); a URI with no `//authority` comes back unchanged."""
    if not isinstance(uri, str) or not _HIERARCHICAL.match(uri):
        return uri, None, None
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    username, has_password, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, unquote(username) or None, unquote(password) if has_password else None


def redact_uri(uri: str) -> str:
    """The URI with its userinfo removed and secret query values replaced; anything else unchanged.

    `http://alice:s3cret@mlflow:5000/x?token=abc&page=2` -> `http://mlflow:5000/x?token=REDACTED&page=2`
    """
    if not isinstance(uri, str) or not _HIERARCHICAL.match(uri):
        return uri
    clean, _, _ = split_credentials(uri)
    parts = urlsplit(clean)
    if not parts.query:
        return clean
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, _REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="/:")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside a free text (a log line, an error message) redacted."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact_uri(m.group(0)), text)


def redact_tree(tree):
    """A copy of a resolved config (dicts, lists, strings, numbers) with every URI-like string redacted."""
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_tree(value) for value in tree)
    if isinstance(tree, str) and "://" in tree:
        return redact_text(tree)
    return tree


def credentials_to_environment(uri: str) -> str:
    """Move the username/password of a tracking URI into MLFLOW_TRACKING_USERNAME / PASSWORD of this process
    (MLflow's own variables; child processes and a Ray started from here inherit them) and return the URI
    without them. A URI without credentials is returned unchanged and the environment is left alone."""
    clean, username, password = split_credentials(uri)
    if username is not None:
        os.environ[USERNAME_VARIABLE] = username
    if password is not None:
        os.environ[PASSWORD_VARIABLE] = password
    return clean
