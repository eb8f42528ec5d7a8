"""MLflow tracking of stages: config, reachability check, the stage run (driver) and its logger (rank 0)."""
from orchestrator.tracking.config import TrackingConfig, default_tracking_uri
from orchestrator.tracking.reachability import TrackingUnreachable, check_tracking_reachable

__all__ = ["TrackingConfig", "default_tracking_uri", "TrackingUnreachable", "check_tracking_reachable"]
