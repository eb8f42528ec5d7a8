"""What of Ray's own messages reaches the pipeline's terminal: every raylet message but one expected notice."""
from __future__ import annotations

# The raylet's notice that more worker processes have started than its start-up concurrency (the node's CPU
# count). A run whose workers hold fractions of a CPU (the embedded preset's four overlapping stages) starts
# more by design, and the raylet repeats the notice at every further multiple.
EXPECTED_NOTICES = ("worker processes have been started on node",)


def quiet_expected_raylet_notices() -> bool:
    """Leave the expected notices out of what Ray prints on this driver; any other raylet message (a worker
    killed for memory, a node gone) still prints. False when this Ray prints raylet messages elsewhere."""
    import ray._private.worker as ray_worker
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        return False
    if getattr(original, "keeps_out", None) == EXPECTED_NOTICES:
        return True

    def print_unexpected(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not any(n in line for n in EXPECTED_NOTICES)]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, *args, **kwargs)

    print_unexpected.keeps_out = EXPECTED_NOTICES
    ray_worker.print_to_stdstream = print_unexpected  # looked up by name each time the driver prints one
    return True
