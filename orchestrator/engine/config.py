"""The typed configuration of one training stage (I, II, III, an FP32 teacher, or a fixed-bit baseline).

Every section rejects unknown keys and names the bad field, so a typo in a YAML preset fails before Ray
starts. `config_hash` is the identity of a resolved stage: the pipeline skips a stage whose hash already
has a FINISHED run in MLflow.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from orchestrator.data.config import DataConfig
from orchestrator.tracking.config import TrackingConfig


def known_architecture(name: str) -> str:
    """The name, if bitmixer_core's registry has it (the registry is the one list of architectures)."""
    from bitmixer_core import available_models  # torch only
    if name not in available_models():
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(available_models())}")
    return name


def check_bit_sets(weights: list[int], activations: list[int]) -> None:
    """The core's BitWidths rules (each set sorted, unique, 1..8; as many weight as activation bit-widths)."""
    from bitmixer_core.bitwidths import BitWidths
    try:
        BitWidths(weights=tuple(weights), activations=tuple(activations))
    except ValueError as err:
        raise ValueError(f"the bit sets (weights {list(weights)}, activations {list(activations)}) are "
                         f"inconsistent: {err}") from None


STORAGE_SCHEMES = ("s3", "gs", "hdfs", "file")


def check_storage_path(value: str) -> str:
    """A local folder, or `<scheme>://<bucket>/...` with a scheme Ray Train's storage (pyarrow) reads."""
    scheme, colon, rest = value.partition(":")
    looks_like_uri = colon and scheme.isalnum() and len(scheme) > 1  # "C:" alone is not a scheme
    if not looks_like_uri:
        return value
    if scheme not in STORAGE_SCHEMES or not rest.startswith("//") or (scheme != "file" and not rest[2:].split("/")[0]):
        from orchestrator.tracking.credentials import redact_uri
        raise ValueError(f"storage path {redact_uri(value)!r} is neither a local folder nor a URI like "
                         f"s3://bucket/prefix; write it as <scheme>://<bucket>/<prefix> with a scheme of "
                         f"{', '.join(STORAGE_SCHEMES)}, or give a local folder.")
    return value


class ModelConfig(BaseModel):
    """Which meta-network to build; passed unchanged to `bitmixer_core.build_model`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Architecture name from bitmixer_core.available_models(), e.g. resnet18.")
    num_classes: int = Field(gt=1, description="Number of output classes.")
    bits_weights: list[int] = Field([2, 3, 4], min_length=1, description="Weight bit-widths, aligned by rank "
                                                                       "with bits_activations.")
    bits_activations: list[int] = Field([2, 3, 4], min_length=1, description="Activation bit-widths; a "
                                                                           "layer's bit-width is this one.")
    stem: Literal["imagenet", "small"] = Field("imagenet", description="ImageNet stem (224 px) or small-input "
                                                                       "stem (32 px).")
    first_last: Literal["fp32", "int8"] = Field("fp32", description="Precision of the first conv and last FC.")
    bn: Literal["transitional", "per_bit", "shared"] = Field("transitional", description="Transitional BN "
                                                             "(section 3.2) or the Table 1 ablations.")
    rounding: Literal["floor", "round"] = Field("floor", description="q' of Eq. 2 (floor in the paper).")
    symmetric: bool = Field(True, description="Symmetric integer range of Eq. 2 (False: asymmetric ablation).")
    nesting: Literal["scale", "clip"] = Field("scale", description="Per-bit step sizes, or the clip-based "
                                                                   "nesting of Eq. 3-4 (ablation).")
    block_order: Literal["conv_bn_relu", "bn_quantize_conv"] = Field(
        "conv_bn_relu", description="Where the quantizers sit (bitmixer_core/models/resnet.py): the classic "
        "conv -> BN -> ReLU with an unsigned activation range (default), or BN -> quantizer -> conv, signed.")

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        return known_architecture(name)

    @model_validator(mode="after")
    def _aligned_bits(self) -> "ModelConfig":
        check_bit_sets(self.bits_weights, self.bits_activations)
        return self

    def build_kwargs(self) -> dict:
        """Plain-data keyword arguments (JSON-able) saved in model.pt so any reader can rebuild the net."""
        return {"num_classes": self.num_classes,
                "bits": {"weights": list(self.bits_weights), "activations": list(self.bits_activations)},
                "stem": self.stem, "first_last": self.first_last, "bn": self.bn, "block_order": self.block_order,
                "quantizer": {"rounding": self.rounding, "symmetric": self.symmetric, "nesting": self.nesting}}

    def build(self):
        """The bitmixer_core model (on CPU, in FP32)."""
        from orchestrator.engine.checkpoint import build_from_kwargs
        return build_from_kwargs(self.name, self.build_kwargs())


class OptimConfig(BaseModel):
    """Adam with L2 weight decay; cosine learning rate with linear warm-up, stepped per iteration (section 5.1)."""

    model_config = ConfigDict(extra="forbid")

    lr_peak: float = Field(1e-3, gt=0, description="Learning rate at the end of the warm-up.")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay (Adam, not AdamW, as in the paper).")
    epochs: int = Field(160, gt=0, description="Epochs of this stage.")
    warmup_epochs: float = Field(10, ge=0, description="Epochs of linear warm-up from 0 to lr_peak.")
    lr_final: float = Field(0.0, ge=0, description="Learning rate at the last iteration of the cosine.")
    max_steps_per_epoch: int | None = Field(None, gt=0, description="Stop each epoch after this many optimizer "
                                            "steps (smoke runs of a preset); unset: the whole training set.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "OptimConfig":
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs}); "
                             f"lower warmup_epochs.")
        return self


class PolicyConfig(BaseModel):
    """Which bit-widths each training iteration uses (section 3.3)."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["fp32", "one", "two", "three", "independent"] = Field(description="A key of "
        "bitmixer_core.STAGES: fp32 (teacher, nothing quantized), one/two/three (Stages I-III), independent "
        "(the Independent baseline: every layer at fixed_bits).")
    fixed_bits: int | None = Field(None, description="Bit-width of the Independent baseline.")
    k: float = Field(0.75, ge=0, le=1, description="Stage III target of 1 - sigma (share of per-layer draws).")
    ramp_epochs: float = Field(80, ge=0, description="Epochs over which 1 - sigma ramps from 0 to k.")
    ramp_shape: Literal["linear", "cosine"] = Field("linear", description="Shape of the 1 - sigma ramp.")
    granularity: Literal["layer", "block"] = Field("layer", description="Stage III draws per layer or per "
                                                                        "residual block.")

    @model_validator(mode="after")
    def _fixed_needs_bits(self) -> "PolicyConfig":
        if self.stage == "independent" and self.fixed_bits is None:
            raise ValueError("policy.fixed_bits is required when policy.stage is 'independent'; set it to one of "
                             "the model's bit-widths.")
        return self


def model_reference(uri: str) -> str:
    """`uri` if the one model loader accepts its source (a local path, runs:/, models:/, s3://); checked when
    the config is read, before Ray starts (orchestrator/engine/checkpoint.py)."""
    from orchestrator.engine.checkpoint import check_model_reference
    return check_model_reference(uri)


class DistillConfig(BaseModel):
    """Knowledge distillation from a frozen teacher of the same architecture (section 4.3)."""

    model_config = ConfigDict(extra="forbid")

    teacher: Literal["none", "path"] = Field("none", description="'path': load the teacher from teacher_uri.")
    teacher_uri: str | None = Field(None, description="A model.pt: a local path, runs:/<id>/model.pt, "
                                                      "models:/<name>/<version> or s3://bucket/key.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KD term.")
    weight: float = Field(1.0, ge=0, description="Weight of the KD term: loss = CE + weight * T^2 * KL.")

    @model_validator(mode="after")
    def _teacher_needs_uri(self) -> "DistillConfig":
        if self.teacher == "path" and not self.teacher_uri:
            raise ValueError("distill.teacher_uri is required when distill.teacher is 'path'; give a model.pt "
                             "path or an MLflow URI.")
        return self

    @field_validator("teacher_uri")
    @classmethod
    def _teacher_source(cls, uri: str | None) -> str | None:
        return None if uri is None else model_reference(uri)


ZERO_THREE_REFUSED = ("zero_stage 3 is not supported: ZeRO-3 partitions every parameter across ranks, while "
                      "calibration, evaluation and model.pt read each layer's weights and step sizes whole; use "
                      "zero_stage 0, 1 or 2 (the meta-network fits on one device).")


def _refuse_zero_three(value):
    if value == 3:
        raise ValueError(ZERO_THREE_REFUSED)
    return value


# One rule wherever a ZeRO stage is written (stage config and pipeline YAML): 3 is refused in one sentence.
ZeroStage = Annotated[Literal[0, 1, 2], BeforeValidator(_refuse_zero_three)]


class DeepSpeedConfig(BaseModel):
    """The DeepSpeed engine of every worker; the JSON config is generated from this (engine/deepspeed_config)."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: ZeroStage = Field(1, description="ZeRO stage (0, 1 or 2; 3 is refused in one sentence).")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    bf16_on_gpu: bool = Field(True, description="bf16 mixed precision on GPU through torch autocast: float32 "
                             "weights, optimizer and BN statistics, bf16 convolutions (CPU always trains in fp32).")
    gradient_clipping: float = Field(0.0, ge=0, description="Max gradient norm (0 = off).")
    compile_blocks: bool = Field(False, description="Train with bitmixer_core.compile_fused_regions: each BN -> "
                                 "ReLU -> quantizer region compiled (a Stage III step 1.02-1.05x a plain one on "
                                 "CPU, against 1.09-1.12x eagerly; docs/benchmarks.md) for a one-time compile of "
                                 "~1-5 min per worker process: for long runs, not a few short epochs. Classic "
                                 "block order, float32 training (a bf16 engine trains eagerly), a C++ compiler.")


class ScalingConfig(BaseModel):
    """Ray Train workers of the stage."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1, description="Data-parallel workers (ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed).")
    start_timeout_s: float = Field(3600.0, gt=0, description="How long a stage's worker group may wait for its "
                                   "resources (stages queue for CPUs on a small machine, for nodes on an "
                                   "autoscaling cluster) before Ray Train times out and retries; Ray's own "
                                   "default is 60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).")


class StageConfig(BaseModel):
    """One stage of Bit-Mixer training = one Ray TorchTrainer run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Stage name (run name, folder name), e.g. resnet18-stage2.")
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    policy: PolicyConfig
    distill: DistillConfig = DistillConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    init_from: str | None = Field(None, description="model.pt of the previous stage (path or MLflow URI).")
    eval_every_epochs: int = Field(1, ge=1, description="Evaluate every N epochs (and always at the end).")
    rand_seeds: list[int] = Field([0, 1, 2], min_length=3, description="Seeds of the 'Rand.' evaluation.")
    seed: int = Field(0, description="Run seed: weights init and the per-step sub-net draws.")
    storage_path: str = Field("./runs", description="Ray storage for checkpoints: a local folder or s3://...")
    max_failures: int = Field(1, ge=0, description="Worker failures tolerated (resume from last checkpoint).")

    @field_validator("init_from")
    @classmethod
    def _init_source(cls, uri: str | None) -> str | None:
        return None if uri is None else model_reference(uri)

    @field_validator("storage_path")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        return check_storage_path(value)

    @model_validator(mode="after")
    def _consistent(self) -> "StageConfig":
        if self.policy.fixed_bits is not None and self.policy.fixed_bits not in self.model.bits_activations:
            raise ValueError(f"policy.fixed_bits ({self.policy.fixed_bits}) is not one of "
                             f"model.bits_activations {self.model.bits_activations}.")
        if self.data.batch_size % self.scaling.num_workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by "
                             f"scaling.num_workers ({self.scaling.num_workers}): it is the global batch.")
        micro = self.data.batch_size // self.scaling.num_workers
        if micro % self.deepspeed.grad_accumulation:
            raise ValueError(f"the per-worker batch ({micro}) must be divisible by "
                             f"deepspeed.grad_accumulation ({self.deepspeed.grad_accumulation}).")
        if self.deepspeed.compile_blocks and self.model.block_order != "conv_bn_relu":
            raise ValueError("deepspeed.compile_blocks compiles the classic block order only: set "
                             "model.block_order to conv_bn_relu or compile_blocks to false.")
        return self

    @property
    def per_worker_batch(self) -> int:
        """Per-worker batch = global // workers (one optimizer step consumes it, in grad_accumulation parts)."""
        return self.data.batch_size // self.scaling.num_workers


# Fields that do not change what is trained: left out of the hash so a re-run with another tracking
# server, storage, worker count, failure budget or number of loader processes still finds the finished stage.
_HASH_EXCLUDE = {"tracking": True, "storage_path": True, "scaling": True, "max_failures": True,
                 "data": {"num_workers"}, "deepspeed": {"compile_blocks"}}


def config_hash(cfg: StageConfig) -> str:
    """sha256 of the canonical JSON of the resolved config (sorted keys, no whitespace) and of the data
    folder's manifest (classes.json, each .beton's size and header): new data under the same path is a
    new stage."""
    from orchestrator.data.folder import manifest_digest
    payload = cfg.model_dump(mode="json", exclude=_HASH_EXCLUDE)
    payload["data_manifest"] = manifest_digest(cfg.data.path)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# What the stages of one Train run must share: its workers, their data and where its checkpoints go.
SHARED_BY_MEMBERS = ("scaling", "data", "storage_path", "max_failures", "optim.epochs", "tracking.tracking_uri")


def side_by_side_signature(cfg: StageConfig) -> str:
    """What a stage must share with the others of its Train run, as text: equal texts can train together."""
    values = []
    for field_path in SHARED_BY_MEMBERS:
        value = cfg
        for part in field_path.split("."):
            value = getattr(value, part)
        values.append(f"{field_path}={value!r}")
    return "; ".join(values)


def check_side_by_side(cfgs: Sequence[StageConfig]) -> None:
    """Stages trained side by side share one Train run: its workers, loaders, epochs and checkpoint storage."""
    if not cfgs:
        raise ValueError("run_stages needs at least one stage config")
    names = [cfg.name for cfg in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"stages trained side by side need distinct names (their checkpoint folders); got {names}")
    signatures = [side_by_side_signature(cfg).split("; ") for cfg in cfgs]
    for position, field_path in enumerate(SHARED_BY_MEMBERS):
        if len({signature[position] for signature in signatures}) > 1:
            raise ValueError(f"stages {names} differ in {field_path}, which stages trained side by side in one "
                             f"Train run share; train them in runs of their own")
