"""The held-out slice of the training set (what a Stage III sweep ranks its trials on), read by real FFCV
loaders: the training loader never yields it, the held-out loader yields exactly it, once."""

from __future__ import annotations

import torch

from orchestrator.data import DataConfig
from orchestrator.data.loaders import build_train_loader, build_val_loader, holdout_split

from .helpers import make_indexed_data_folder

TRAIN, VAL = 60, 10


def test_training_loader_skips_the_held_out_slice_which_its_own_loader_reads(tmp_path):
    data = make_indexed_data_folder(tmp_path / "data", train=TRAIN, val=VAL)
    cfg = DataConfig(path=str(data), train_resolution=8, val_resolution=8, val_crop_ratio=1.0, batch_size=4,
                     num_workers=1, holdout_fraction=0.2)
    cpu = torch.device("cpu")
    kept, held = (set(a.tolist()) for a in holdout_split(TRAIN, 0.2))
    train = build_train_loader(cfg, rank=0, world_size=1, device=cpu, distributed=False)
    seen = [int(label) for _, labels in train for label in labels]
    assert set(seen) <= kept and len(seen) == len(kept) // 4 * 4  # full batches of the kept images only
    holdout = build_val_loader(cfg, rank=0, world_size=1, device=cpu, holdout=True)
    assert sorted(int(label) for _, labels in holdout for label in labels) == sorted(held)
    val = build_val_loader(cfg, rank=0, world_size=1, device=cpu)
    assert sorted(int(label) for _, labels in val for label in labels) == list(range(VAL))
