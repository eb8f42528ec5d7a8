"""One epoch of an FFCV loader that stops its decoding thread when the epoch is left early.

FFCV decodes an epoch's batches on a thread of its own. Leaving the epoch early (a `break`, an exception, a
single `next(iter(loader))`) leaves that thread decoding, and FFCV's own close only asks it to stop once its
output queue is full. A process that exits while the thread is inside numba's parallel code aborts
("terminate called without an active exception"), and FFCV frees the epoch's buffers under a thread still
writing them. `epoch_batches` ends the thread before the epoch's buffers go.
"""

from __future__ import annotations

from queue import Empty
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # FFCV itself is imported by `loaders`, after the compile cache is on
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator


def epoch_batches(loader: Loader) -> Iterator[tuple]:
    """FFCV's batches of the loader's next epoch; when the generator is closed early (or collected), the
    decoding thread has ended before this returns."""
    epoch = iter(loader)
    try:
        yield from epoch
    finally:
        stop_decoding(epoch)


def stop_decoding(epoch: EpochIterator) -> None:
    """Ends an epoch's decoding thread: it finishes the batch in hand, finds no batch left, and hands out the
    end-of-epoch marker, while the batches it queued are taken off so that none of its puts waits."""
    epoch.iter_ixes = iter(())  # read by the thread before each batch
    while epoch.is_alive():
        try:
            if epoch.output_queue.get(timeout=0.1) is None:
                break
        except Empty:  # still decoding the batch in hand
            pass
    epoch.join()
    epoch.close()
