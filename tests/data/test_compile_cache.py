"""FFCV's numba code through numba's on-disk cache (orchestrator.data.compile_cache): the first process
compiles the loaders' pipelines into the cache folder, a later process loads them from it instead of
compiling them again, and the batches are the same either way. Each reading runs in a fresh process,
since the cache only matters to a process that has compiled nothing yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .helpers import make_indexed_data_folder

REPO = Path(__file__).resolve().parents[2]

# One fresh process: (optionally) the cache on, a training and a validation loader, their first batches, and
# numba's own count of cache hits and misses over the functions compiled with its cache on.
READ_FIRST_BATCHES = """
import gc, json, sys
sys.path.insert(0, {repo!r})
import torch
from numba.core.dispatcher import Dispatcher
if {cache_dir!r}:
    from orchestrator.data.compile_cache import enable_compile_cache
    enable_compile_cache({cache_dir!r})
    enable_compile_cache({cache_dir!r})  # twice changes nothing
from orchestrator.data import DataConfig
from orchestrator.data.loaders import build_train_loader, build_val_loader
cfg = DataConfig(path={data!r}, train_resolution=8, val_resolution=8, val_crop_ratio=1.0, batch_size=4,
                 num_workers=1, seed=3)
cpu = torch.device("cpu")
train = build_train_loader(cfg, rank=0, world_size=1, device=cpu, distributed=False)
train.set_epoch(0)
images, labels = next(iter(train))
val_images, _ = next(iter(build_val_loader(cfg, rank=0, world_size=1, device=cpu)))
from numba.core.caching import NullCache
dispatchers = [d for d in gc.get_objects() if isinstance(d, Dispatcher) and not isinstance(d._cache, NullCache)]
print(json.dumps({{
    "hits": sum(sum(d.stats.cache_hits.values()) for d in dispatchers),
    "misses": sum(sum(d.stats.cache_misses.values()) for d in dispatchers),
    "train": images.flatten().tolist(), "labels": labels.tolist(), "val": val_images.flatten().tolist()}}))
"""


def first_batches(data: Path, cache_dir: Path | None) -> dict:
    code = READ_FIRST_BATCHES.format(repo=str(REPO), data=str(data), cache_dir=str(cache_dir) if cache_dir else "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Cannot cache compiled function" not in done.stderr  # the expected misses stay out of the log
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_loaders_code_from_the_cache_and_reads_the_same_batches(tmp_path):
    data = make_indexed_data_folder(tmp_path / "data", train=24, val=8)
    cache = tmp_path / "numba-cache"
    plain = first_batches(data, None)
    first = first_batches(data, cache)
    assert first["misses"] > 0  # compiled, and written to the cache (the validation loader reuses a few)
    assert any(cache.rglob("*.nbi")) and any(cache.rglob("*.nbc"))
    later = first_batches(data, cache)
    assert later["hits"] + later["misses"] == first["hits"] + first["misses"]  # the same functions
    # Loaded from disk, except those numba cannot cache (FFCV's decoders hold a ctypes pointer).
    assert later["hits"] > first["hits"] and later["misses"] < first["misses"]
    for reading in (first, later):
        assert (reading["train"], reading["labels"], reading["val"]) == (plain["train"], plain["labels"], plain["val"])
