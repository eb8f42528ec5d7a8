"""Fail a stage at start, in one sentence, when its tracking store cannot be reached."""
from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.tracking.config import TrackingConfig
from orchestrator.tracking.credentials import (PASSWORD_VARIABLE, USERNAME_VARIABLE, redact_uri,
                                               split_credentials)


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server or store of a stage cannot be used."""


def health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health, with HTTP basic auth from the URI's userinfo or MLflow's variables.

    urllib cannot open a URL that carries `user:password@` (it reads the password as a port), so the
    credentials are taken out of the URL and sent as an Authorization header instead.
    """
    clean, username, password = split_credentials(uri)
    username = username if username is not None else os.environ.get(USERNAME_VARIABLE)
    password = password if password is not None else os.environ.get(PASSWORD_VARIABLE)
    request = urllib.request.Request(clean.rstrip("/") + "/health")
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    return request


def check_tracking_reachable(cfg: TrackingConfig) -> None:
    """HTTP: the server must answer (any HTTP status counts: an auth proxy answering 401 is reachable) within
    `connect_timeout_s`. sqlite: the folder of the database must exist."""
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(health_request(uri), timeout=cfg.connect_timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnreachable(
                f"The MLflow tracking server at {redact_uri(uri)} is unreachable ({reason}); start it or fix "
                f"tracking.tracking_uri before running the stage.") from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingUnreachable(
                f"The folder {folder} of the MLflow sqlite store {uri} does not exist; create it or fix "
                f"tracking.tracking_uri.")
