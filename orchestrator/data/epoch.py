"""One epoch of an FFCV loader: it ends cleanly when left early, and with an error when decoding fails.

FFCV decodes an epoch's batches on a thread of its own (`EpochIterator`), and two of its behaviours need a
hand here:
- Leaving an epoch early (a `break`, an exception, a single `next(iter(loader))`) leaves that thread
  decoding: FFCV's close only asks it to stop once its output queue is full. A process that exits while the
  thread is inside numba's parallel code aborts ("terminate called without an active exception"), and FFCV
  frees the epoch's buffers under a thread still writing them. `epoch_batches` ends the thread first.
- A batch whose decoding raises kills the thread without the end-of-epoch marker, and the consumer then
  waits for a batch forever: a training worker hangs and its run stays RUNNING. FFCV's loader builds its
  epochs from `ReportingEpochIterator` instead, which hands the marker out and keeps the error, and
  `epoch_batches` raises it.
"""

from __future__ import annotations

from queue import Empty
from typing import Iterator

from .compile_cache import enable_compile_cache
from .errors import DataError

enable_compile_cache()  # before FFCV is imported (see `compile_cache`)

import ffcv.loader.loader  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402


class ReportingEpochIterator(EpochIterator):
    """FFCV's epoch thread, which on an error ends the epoch (the consumer's next batch is the end marker)
    and keeps the error in `failure`."""

    failure: BaseException | None = None

    def run(self):
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self.failure = error
            self.output_queue.put(None)


ffcv.loader.loader.EpochIterator = ReportingEpochIterator  # `Loader.__iter__` looks the class up there


def epoch_batches(loader: Loader) -> Iterator[tuple]:
    """FFCV's batches of the loader's next epoch. Raises DataError when decoding a batch failed; when the
    generator is closed early (or collected), the decoding thread has ended before this returns."""
    epoch = iter(loader)
    try:
        yield from epoch
        epoch.join()  # it handed out the end marker and is returning
        if epoch.failure is not None:
            raise DataError(f"reading a batch failed ({type(epoch.failure).__name__}: {epoch.failure}), so the "
                            "epoch cannot go on; a data folder that no longer reads is written again with "
                            "pipelines/prepare_data.py.") from epoch.failure
    finally:
        stop_decoding(epoch)


def stop_decoding(epoch: EpochIterator) -> None:
    """Ends an epoch's decoding thread: it finishes the batch in hand, finds no batch left, and hands out the
    end-of-epoch marker, while the batches it queued are taken off so that none of its puts waits. At once
    for a thread that has ended."""
    epoch.iter_ixes = iter(())  # read by the thread before each batch
    while epoch.is_alive():
        try:
            if epoch.output_queue.get(timeout=0.1) is None:
                break
        except Empty:  # still decoding the batch in hand
            pass
    epoch.join()
    epoch.close()
