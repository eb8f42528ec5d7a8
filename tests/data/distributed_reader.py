"""One rank of `test_distributed.py`: joins a gloo group on loopback, reads, writes the labels it saw as JSON.

Run as `python distributed_reader.py RANK WORLD_SIZE PORT DATA_DIR OUT_JSON`.
"""

import json
import sys

import torch
import torch.distributed as dist

from orchestrator.data import DataConfig, build_loaders

rank, world_size, port, data_dir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
try:
    cfg = DataConfig(path=data_dir, train_resolution=8, val_resolution=8, val_crop_ratio=1.0, batch_size=20,
                     num_workers=1, seed=7)
    train, val = build_loaders(cfg, rank=rank, world_size=world_size, device=torch.device("cpu"), distributed=True)
    seen = {"batch_size": train.batch_size, "train_batches": len(train)}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        seen[f"train_{epoch}"] = [int(label) for _, labels in train for label in labels]
    seen["val"] = [int(label) for _, labels in val for label in labels]
    with open(out, "w") as f:
        json.dump(seen, f)
finally:
    dist.destroy_process_group()
