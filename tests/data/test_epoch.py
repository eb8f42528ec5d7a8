"""FFCV epochs (`orchestrator.data.epoch`): leaving one early ends its decoding thread, and the loader's next
epoch is whole; a batch that fails to decode ends the epoch with the error.

A decoding thread left running made a process that exits after a partial epoch abort ("terminate called
without an active exception") about one time in three; a failed batch left the consumer waiting forever."""

from __future__ import annotations

import threading

import torch

from orchestrator.data import DataConfig, DataError
from orchestrator.data.loaders import build_train_loader, build_val_loader  # turns the compile cache on

from ffcv.pipeline.operation import Operation  # noqa: E402, I001 (after the compile cache is on)

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


class FailOnSample(Operation):
    """A label pipeline step that raises on one sample, as a decoder meeting a damaged image would."""

    def __init__(self, sample: int):
        super().__init__()
        self.sample = sample

    def generate_code(self):
        sample = self.sample

        def check(labels, destination):
            for i in range(labels.shape[0]):
                if labels[i] == sample:
                    raise ValueError("this sample does not decode")
            return labels

        return check

    def declare_state_and_memory(self, previous_state):
        return previous_state, None


def test_a_batch_that_fails_to_decode_ends_the_epoch_with_the_error_instead_of_waiting_forever(tmp_path):
    """FFCV's own epoch thread dies on the error and its consumer waits for the next batch forever (a worker
    that hangs, a run left RUNNING): the epoch must end with a DataError that names the cause."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption

    from orchestrator.data.epoch import epoch_batches

    data = make_indexed_data_folder(tmp_path / "data", train=TRAIN, val=VAL)
    loader = Loader(str(data / "train.beton"), batch_size=BATCH, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": None, "label": [IntDecoder(), FailOnSample(13)]})
    outcome = {"batches": 0}

    def read_the_epoch():
        try:
            for _ in epoch_batches(loader):
                outcome["batches"] += 1
        except Exception as error:  # noqa: BLE001 - examined below
            outcome["error"] = error

    reader = threading.Thread(target=read_the_epoch, daemon=True)
    reader.start()
    reader.join(timeout=120)  # minutes more than the epoch takes; without the fix it never ends
    assert not reader.is_alive(), "the epoch is still waiting for a batch after its decoding thread failed"
    error = outcome.get("error")
    assert isinstance(error, DataError), repr(error)
    assert "ValueError: this sample does not decode" in str(error) and isinstance(error.__cause__, ValueError)
    assert outcome["batches"] == 13 // BATCH  # the batches before the failing one, in order
    assert decoding_threads() == []
