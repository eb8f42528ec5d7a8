"""Leaving an FFCV epoch early: the decoding thread ends with it, and the loader's next epoch is whole.

A decoding thread left running made a process that exits after a partial epoch abort ("terminate called
without an active exception") about one time in three."""

from __future__ import annotations

import threading

import torch

from orchestrator.data import DataConfig
from orchestrator.data.loaders import build_train_loader, build_val_loader

from .helpers import make_indexed_data_folder

TRAIN, VAL, BATCH = 64, 24, 4


def decoding_threads() -> list[threading.Thread]:
    from ffcv.loader.epoch_iterator import EpochIterator

    return [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


def test_an_epoch_left_after_one_batch_stops_its_decoding_thread_and_the_next_epoch_is_whole(tmp_path):
    data = make_indexed_data_folder(tmp_path / "data", train=TRAIN, val=VAL)
    cfg = DataConfig(path=str(data), train_resolution=8, val_resolution=8, val_crop_ratio=1.0,
                     batch_size=BATCH, num_workers=1)
    cpu = torch.device("cpu")
    train = build_train_loader(cfg, rank=0, world_size=1, device=cpu, distributed=False)
    val = build_val_loader(cfg, rank=0, world_size=1, device=cpu)
    for loader in (train, val):
        batches = iter(loader)
        next(batches)
        assert decoding_threads()  # FFCV decodes ahead while the first batch is in hand
        batches.close()  # what a `break` or a dropped iterator does
        assert decoding_threads() == []
    for _ in train:  # a `break` inside a training loop
        break
    assert decoding_threads() == []
    train.set_epoch(1)
    assert sorted(label for _, labels in train for label in labels.tolist()) == list(range(TRAIN))
    assert sorted(label for _, labels in val for label in labels.tolist()) == list(range(VAL))
    assert decoding_threads() == []
