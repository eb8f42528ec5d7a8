"""Bit-Mixer, the whole paper: every architecture's Stage I -> II -> III (optional FP32 teacher), the
Stage III sweep over k and sigma, the Independent baseline and the ablations, then the paper's tables.

    python pipelines/full_paper.py                                   # the embedded default, local Ray
    python pipelines/full_paper.py --config pipelines/configs/imagenet.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/full_paper.py --config pipelines/configs/imagenet.yaml

Re-running the same config skips every stage already finished (found in MLflow by config hash, with its
model.pt); `--retrain` trains them again. One pipeline per work dir at a time.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from orchestrator.pipeline.config import PipelineConfigError, load_pipeline_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "embedded.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML (default: embedded.yaml)")
    parser.add_argument("--retrain", action="store_true",
                        help="train every stage again, even those MLflow holds as FINISHED with the same config")
    parser.add_argument("--smoke", action="store_true",
                        help="the preset's whole DAG at toy size (digits at 32 px, 2 steps a stage, local CPU): "
                             "proves a preset before a cluster pays for it")
    args = parser.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.config)  # every key checked before anything starts
        if args.smoke:
            from orchestrator.pipeline.smoke import smoke_config
            cfg = smoke_config(cfg)
    except PipelineConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # SIGTERM (a cancelled job, a CI timeout) unwinds like Ctrl-C: the local Ray we started is stopped and
    # every MLflow run still open under the pipeline run ends KILLED.
    terminated = []

    def on_sigterm(*_):
        terminated.append(True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_sigterm)
    from orchestrator.pipeline.app import run_pipeline, ui_command
    from orchestrator.pipeline.paper_tables import render_markdown
    try:
        report = run_pipeline(cfg, retrain=args.retrain)
    except (PipelineConfigError, RuntimeError, ValueError) as err:  # bad input, unreachable MLflow, busy work dir
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit:
        if not terminated:  # (Ray may re-raise the signal's exit with a code of its own)
            raise
        print("stopped by SIGTERM: the runs still open were marked KILLED; run the same command again to resume",
              file=sys.stderr)
        return 143
    print()
    print(render_markdown(report.tables))
    print(report.summary())
    print(f"\nTables and runs in MLflow (pipeline run {report.run_id}):\n  {ui_command(report.tracking_uri, report.experiment_id, report.run_id)}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
