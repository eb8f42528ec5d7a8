"""Sharding across ranks, with a real gloo process group of two processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import make_indexed_data_folder

TRAIN, VAL = 200, 101  # odd validation size: a padding sampler would read one image twice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """What each of two ranks read (labels are sample indices)."""
    root = tmp_path_factory.mktemp("distributed")
    data = make_indexed_data_folder(root / "data", train=TRAIN, val=VAL)
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    reader = Path(__file__).with_name("distributed_reader.py")
    procs = [
        subprocess.Popen([sys.executable, str(reader), str(rank), "2", str(port), str(data), str(root / f"{rank}.json")],
                         env=env)
        for rank in range(2)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    return [json.loads((root / f"{rank}.json").read_text()) for rank in range(2)]


def test_training_shards_are_disjoint_halves(shards):
    """With distributed=True each rank reads its own half of the training set (batch_size // world_size per
    batch), the halves share no image and together cover it; the next epoch reshuffles."""
    for rank in shards:
        assert rank["batch_size"] == 10 and rank["train_batches"] == 10
    for epoch in (0, 1):
        first, second = (set(rank[f"train_{epoch}"]) for rank in shards)
        assert len(shards[0][f"train_{epoch}"]) == len(shards[1][f"train_{epoch}"]) == TRAIN // 2
        assert not first & second
        assert first | second == set(range(TRAIN))
    assert shards[0]["train_0"] != shards[0]["train_1"]


def test_validation_reads_every_image_exactly_once(shards):
    """Validation shards of an odd-sized set: no image read twice (no padding), none missed (no drop_last)."""
    read = shards[0]["val"] + shards[1]["val"]
    assert sorted(read) == list(range(VAL))
