"""Find good sub-nets of a trained Bit-Mixer meta-network for average-bit (and BitOPs) budgets.

    python pipelines/find_subnets.py --model runs:/<run_id>/model.pt --avg-bits 2.5 3 3.5 --top-k 5

Logic: orchestrator/deploy/cli.py (search, evaluation, Fig. 4 and the analysis plots, MLflow logging).
"""
import sys

from orchestrator.deploy.cli import find_subnets_main

if __name__ == "__main__":
    sys.exit(find_subnets_main())
