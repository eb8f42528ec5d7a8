"""Validation batches for the deployment commands, read exactly as training's validation loader reads them."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import DataSource
from .subnets import materialize


def validation_batches(source: DataSource) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """'digits': the embedded data set (written once under ``work_dir``); otherwise a prepared data folder."""
    from orchestrator.data.config import DataConfig
    from orchestrator.data.loaders import build_val_loader

    if source.data == "digits":
        from orchestrator.data.embedded import write_embedded_digits

        folder = write_embedded_digits(Path(source.work_dir) / "digits")
    else:
        folder = Path(source.data)
        if not (folder / "val.beton").is_file():
            raise FileNotFoundError(f"data folder {source.data!r} has no val.beton; pass 'digits' or a folder "
                                    "written by pipelines/prepare_data.py.")
    cfg = DataConfig(path=str(folder), val_resolution=source.val_resolution, val_crop_ratio=source.val_crop_ratio,
                     batch_size=source.batch_size, num_workers=1)
    loader = build_val_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    return materialize(loader, source.max_batches)
