"""Fail a stage at start, in one sentence, when its tracking store cannot be reached."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.tracking.config import TrackingConfig


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server or store of a stage cannot be used."""


def check_tracking_reachable(cfg: TrackingConfig) -> None:
    """HTTP: the server must answer (any HTTP status counts: an auth proxy answering 401 is reachable) within
    `connect_timeout_s`. sqlite: the folder of the database must exist."""
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=cfg.connect_timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnreachable(
                f"The MLflow tracking server at {uri} is unreachable ({reason}); start it or fix "
                f"tracking.tracking_uri before running the stage.") from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingUnreachable(
                f"The folder {folder} of the MLflow sqlite store {uri} does not exist; create it or fix "
                f"tracking.tracking_uri.")
