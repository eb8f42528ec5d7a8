"""Export a trained Bit-Mixer meta-network as one artifact with packed n-bit integer weights.

    python pipelines/export.py --model path/to/model.pt --out resnet18.bmx [--lower-bits exact|derived]

Logic: orchestrator/deploy/cli.py; format: bitmixer_core/export.py.
"""
import sys

from orchestrator.deploy.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
