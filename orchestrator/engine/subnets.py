"""Which sub-net every training step uses, drawn identically on every data-parallel rank.

Each step's draw comes from a generator seeded from (run seed, global step) alone, so ranks agree without
communicating, and a resumed run draws the same sub-nets as an uninterrupted one. A running sha256 of the
draws lets a test compare the sequences of all ranks.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

import bitmixer_core as core
from orchestrator.engine.config import ModelConfig, PolicyConfig


def step_seed(run_seed: int, global_step: int) -> int:
    """A 63-bit seed mixing the run seed and the step (neighbouring steps get unrelated streams)."""
    digest = hashlib.sha256(f"bitmixer:{run_seed}:{global_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stage_policy(policy: PolicyConfig, model: ModelConfig) -> core.StagePolicy | None:
    """The core's StagePolicy for Stages I-III; None for the FP32 teacher and Independent (no random draw)."""
    bits = core.BitWidths(weights=tuple(model.bits_weights), activations=tuple(model.bits_activations))
    return core.get_stage(policy.stage).policy(bits, k=policy.k, ramp_epochs=policy.ramp_epochs,
                                               ramp_shape=policy.ramp_shape, granularity=policy.granularity)


def set_stage_precision(net: nn.Module, stage: str) -> None:
    """What the stage quantizes (core.Stage): nothing for the FP32 teacher, activations in Stage I, both after."""
    core.get_stage(stage).set_precision(net)


class SubnetSampler:
    """Draws and applies the sub-net of each global step; `digest` fingerprints every draw so far."""

    def __init__(self, net: nn.Module, policy: PolicyConfig, model: ModelConfig, run_seed: int):
        self.net, self.stage, self.run_seed = net, policy.stage, run_seed
        self.policy = stage_policy(policy, model)
        self.layer_names = [name for name, _ in core.quantized_layers(net)]
        self.blocks = core.residual_blocks(net) if policy.granularity == "block" else None
        self.fixed_bits = policy.fixed_bits
        self._hash = hashlib.sha256()
        self.draws = 0

    def draw(self, global_step: int, epoch: float) -> core.BitAssignment | None:
        if self.stage == "fp32":
            return None
        if self.stage == "independent":
            return core.BitAssignment(bits=(self.fixed_bits,) * len(self.layer_names), quantize_weights=True)
        generator = torch.Generator().manual_seed(step_seed(self.run_seed, global_step))
        return self.policy.sample(self.layer_names, self.blocks, epoch, generator)

    def apply(self, global_step: int, epoch: float) -> core.BitAssignment | None:
        assignment = self.draw(global_step, epoch)
        if assignment is not None:
            core.apply_assignment(self.net, assignment)
            self._hash.update(f"{global_step}:{assignment.bits}:{assignment.quantize_weights};".encode())
            self.draws += 1
        return assignment

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()
