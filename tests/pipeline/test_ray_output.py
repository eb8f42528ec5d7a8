"""The pipeline's terminal: the raylet's expected start-up notice is left out, every other raylet message is
printed, through Ray's own printing function."""
from __future__ import annotations

NOTICE = ("WARNING: 12 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which is "
          "6x the maximum expected startup concurrency (2). This could be a result of ...")
OTHER = "Task was killed due to the node running low on memory."


def test_the_expected_notice_is_left_out_and_other_raylet_messages_print(capsys):
    import ray._private.worker as ray_worker

    from orchestrator.pipeline.ray_output import quiet_expected_raylet_notices
    assert quiet_expected_raylet_notices()
    assert quiet_expected_raylet_notices()  # once only: a second call does not wrap it again
    ray_worker.print_to_stdstream({"lines": [NOTICE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": [NOTICE, OTHER], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "worker processes have been started" not in printed
    assert printed.count(OTHER) == 1
