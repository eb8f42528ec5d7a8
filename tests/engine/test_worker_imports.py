"""What a Train worker imports: a rank that does not log imports DeepSpeed without mlflow (DeepSpeed's own
import of it is for its autotuner, which a stage never runs), and mlflow imports as usual afterwards.
A fresh process each time, since an import happens once per process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

IMPORT_DEEPSPEED = """
import json, sys
from orchestrator.engine.worker import _mlflow_not_importable
before = "mlflow" in sys.modules
with _mlflow_not_importable():
    import deepspeed
    import deepspeed.autotuning.autotuner as autotuner
during = "mlflow" in sys.modules and sys.modules["mlflow"] is not None
import mlflow  # a teacher or a checkpoint read from MLflow later on
print(json.dumps({"before": before, "during": during, "autotuner_has_mlflow": autotuner.has_mlflow,
                  "after": hasattr(mlflow, "MlflowClient")}))
"""


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_afterwards():
    out = subprocess.run([sys.executable, "-c", IMPORT_DEEPSPEED], cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                         "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"before": False, "during": False, "autotuner_has_mlflow": False, "after": True}
