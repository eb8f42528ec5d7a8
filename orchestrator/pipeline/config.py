"""The typed configuration of the whole-paper pipeline (`pipelines/full_paper.py --config YAML`).

One YAML file says *what* to run: which architectures, which stages (FP32 teacher optional -> I -> II ->
III) with how many epochs, which teacher, which Stage III sweep, which baselines and ablations of the
paper, on which data, on how many workers, recorded where. `load_pipeline_config` turns it into a
`PipelineConfig` and rejects a wrong key or value with its path in the file
("architectures[0].stages.two.epochs: ...") before Ray, MLflow or any data is touched.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.data.config import DataConfig
from orchestrator.engine.config import (DeepSpeedConfig, DistillConfig, ModelConfig,
                                        OptimConfig, PolicyConfig, ScalingConfig, StageConfig, check_bit_sets,
                                        check_storage_path, known_architecture, ZeroStage)

STAGE_NAMES = ("zero", "one", "two", "three")
Teacher = Literal["none", "stage_one", "fp32"]
Objective = Literal["mean_bits_and_rand", "rand", "lowest_bit"]


def _same(model: type[BaseModel], name: str, **changes):
    """The engine's declaration of a setting (type, default, bounds, description), reused here as is, so
    the pipeline YAML and the stage config have one rule per setting."""
    info = copy.copy(model.model_fields[name])
    for key, value in changes.items():
        setattr(info, key, value)
    return info


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizerSpec(Strict):
    """bitmixer_core.QuantizerOptions as data (Table 5 and section 4.5 switch these); the engine's fields."""

    rounding: ModelConfig.model_fields["rounding"].annotation = _same(ModelConfig, "rounding")
    symmetric: bool = _same(ModelConfig, "symmetric")
    nesting: ModelConfig.model_fields["nesting"].annotation = _same(ModelConfig, "nesting")


class BitsSpec(Strict):
    """The bit set of the meta-network: activations[i] goes with weights[i] (Table 4 pairs A2 with W1).
    The core's BitWidths rules: each set sorted and unique, 1..8, the same length."""

    weights: list[int] = Field(default_factory=lambda: [2, 3, 4])
    activations: list[int] = Field(default_factory=lambda: [2, 3, 4])

    @model_validator(mode="after")
    def _paired(self) -> "BitsSpec":
        check_bit_sets(self.weights, self.activations)
        return self

    @property
    def is_same(self) -> bool:
        return sorted(self.weights) == sorted(self.activations)


class StageSpec(OptimConfig):
    """One training stage: the engine's OptimConfig (lr_peak, weight_decay, epochs, warmup_epochs, lr_final;
    defaults are the paper's recipe of section 5.1: Adam, lr 1e-3, wd 1e-4, cosine with warm-up) plus
    whether it runs and how often it is evaluated."""

    enabled: bool = True
    eval_every: int = _same(StageConfig, "eval_every_epochs")

    def optim(self) -> OptimConfig:
        return OptimConfig(**self.model_dump(include=set(OptimConfig.model_fields)))


class StageThreeSpec(StageSpec):
    """Stage III: with probability sigma the Stage II draw, otherwise per-layer (or per-block) draws;
    1 - sigma ramps from 0 to k over ramp_epochs, then stays at k (section 3.3). The engine's PolicyConfig
    fields."""

    k: float = _same(PolicyConfig, "k")
    ramp_epochs: float = _same(PolicyConfig, "ramp_epochs")
    ramp_shape: PolicyConfig.model_fields["ramp_shape"].annotation = _same(PolicyConfig, "ramp_shape")
    granularity: PolicyConfig.model_fields["granularity"].annotation = _same(PolicyConfig, "granularity")


class StagesSpec(Strict):
    """zero = the optional FP32 teacher; one/two/three = the paper's stages I/II/III."""

    zero: StageSpec = Field(default_factory=lambda: StageSpec(enabled=False))
    one: StageSpec = Field(default_factory=StageSpec)
    two: StageSpec = Field(default_factory=StageSpec)
    three: StageThreeSpec = Field(default_factory=StageThreeSpec)

    @model_validator(mode="after")
    def _chain_unbroken(self) -> "StagesSpec":
        # Each stage resumes from the previous one: a gap would leave a stage with nothing to start from.
        chain = [self.one.enabled, self.two.enabled, self.three.enabled]
        if any(not before and after for before, after in zip(chain, chain[1:])):
            raise ValueError(f"stages must run without gaps (one -> two -> three), got enabled one/two/three "
                             f"= {chain}; disable only trailing stages")
        return self


class ArchitectureSpec(Strict):
    """One architecture of the experiment: the engine's ModelConfig name and options (its bits and classes
    come from the pipeline's `bits` and `data`)."""

    name: str = _same(ModelConfig, "name")
    stem: ModelConfig.model_fields["stem"].annotation = _same(ModelConfig, "stem")
    first_last: ModelConfig.model_fields["first_last"].annotation = _same(ModelConfig, "first_last")
    bn: ModelConfig.model_fields["bn"].annotation = _same(ModelConfig, "bn")
    block_order: ModelConfig.model_fields["block_order"].annotation = _same(ModelConfig, "block_order")
    quantizer: QuantizerSpec = Field(default_factory=QuantizerSpec)
    stages: StagesSpec = Field(default_factory=StagesSpec)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return known_architecture(name)


class DistillationSpec(Strict):
    """Section 4.3: teacher for Stages II and III (same architecture, frozen); KD = softened KL + CE.
    Table 2's best rows use the Stage I network for Stage II and the FP32 one for Stage III:
    `teacher: stage_one` with `stage_three_teacher: fp32`."""

    teacher: Teacher = "none"
    stage_three_teacher: Teacher | None = Field(None, description="Stage III's teacher when it differs from "
                                                                 "Stage II's (`teacher`); unset: the same.")
    temperature: float = _same(DistillConfig, "temperature")
    weight: float = _same(DistillConfig, "weight")


class SweepSpec(Strict):
    """Ray Tune over Stage III: every trial starts from the same Stage II model; the best becomes the
    architecture's final model (registered in the MLflow model registry)."""

    enabled: bool = True
    k: list[float] = Field(default_factory=lambda: [2 / 3, 3 / 4, 4 / 5])
    ramp_epochs: list[int] = Field(default_factory=lambda: [80])
    ramp_shape: list[Literal["linear", "cosine"]] = Field(default_factory=lambda: ["linear"])
    objective: Objective = "mean_bits_and_rand"
    holdout_fraction: float = Field(0.1, gt=0, le=0.5, description="Share of the training set every trial "
                                    "holds out of training and is scored on (never the validation set).")
    num_samples: int = Field(1, ge=1, description="Repeats of the grid (each repeat = one trial per point).")
    asha: bool = False
    grace_period: int = Field(1, ge=1, description="ASHA: epochs a trial runs before it can be stopped.")
    max_concurrent_trials: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _non_empty(self) -> "SweepSpec":
        for name in ("k", "ramp_epochs", "ramp_shape"):
            if self.enabled and not getattr(self, name):
                raise ValueError(f"sweep.{name} is empty; give at least one value or set sweep.enabled: false")
        for k in self.k:
            if not 0 < k <= 1:
                raise ValueError(f"k={k} is not a probability in (0, 1]")
        return self

    @property
    def num_trials(self) -> int:
        return len(self.k) * len(self.ramp_epochs) * len(self.ramp_shape) * self.num_samples


class IndependentSpec(Strict):
    """The 'Indep.' column: one network per fixed bit-width (weights and activations at b), trained from
    the Stage I network for as long as Stage II, so it differs from Stage II only in the bits it sees."""

    enabled: bool = False
    bits: list[int] | None = Field(None, description="Default: the activation bit set (plus 1 for Table 3).")
    architectures: list[str] | None = Field(None, description="Default: every architecture.")
    one_train_run: bool = Field(False, description="Train an architecture's Independent networks side by side in "
                                "one Train run (the same worker processes, one epoch of each in turn): one "
                                "start-up instead of one per network, for a small machine; separate runs "
                                "finish sooner where the cluster has room for all of them at once.")


class BaselinesSpec(Strict):
    independent: IndependentSpec = Field(default_factory=IndependentSpec)


class AblationsSpec(Strict):
    """The paper's ablations (section 4), each a switch; run on `architecture` (the paper: ResNet-18)."""

    architecture: str | None = Field(None, description="Default: the first architecture.")
    no_transitional_bn: bool = Field(False, description="Table 1: one shared BN instead of Transitional BN.")
    teachers: bool = Field(False, description="Table 2: Stages II/III with teacher none / Stage I / FP32.")
    bits_4321: bool = Field(False, description="Table 3: bit set {1,2,3,4}, Stages I and II.")
    ternary_binary: bool = Field(False, description="Table 4: activations {2,3,4} with weights {1,3,4}.")
    quantizers: bool = Field(False, description="Table 5: symmetric / asymmetric / asymmetric with round.")

    @property
    def any(self) -> bool:
        return any((self.no_transitional_bn, self.teachers, self.bits_4321, self.ternary_binary,
                    self.quantizers))


class DataSpec(DataConfig):
    """The data package's DataConfig, plus where the data comes from: `embedded: digits` writes the
    scikit-learn digits under the work dir; otherwise `path` holds train/val .beton + classes.json."""

    path: str | None = None
    embedded: Literal["digits"] | None = None
    num_classes: int = Field(1000, ge=2)

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.path is None) == (self.embedded is None):
            raise ValueError("give exactly one of data.path (a folder with train.beton, val.beton, "
                             "classes.json) or data.embedded: digits")
        return self

    def loader_config(self, path: str) -> DataConfig:
        fields = self.model_dump(exclude={"path", "embedded", "num_classes"})
        return DataConfig(path=path, **fields)


class ScalingSpec(ScalingConfig):
    """The engine's ScalingConfig (Ray Train workers per stage and the resources of each), its ZeRO stage
    and failure budget, plus what a Tune trial's own (driver) process asks for (trial_cpus), which must
    leave room for its workers on a small machine."""

    gpus_per_worker: float = Field(0.0, ge=0)
    trial_cpus: float = Field(1.0, ge=0)
    pack_architectures: bool = Field(False, description="Train each stage of the main chain (not a Tune sweep) of "
                                     "every architecture side by side in one Train run (the same worker "
                                     "processes, one epoch of each in turn): one start-up instead of one per "
                                     "architecture, for a small machine; a failure then stops them all, and "
                                     "separate runs finish sooner where the cluster has room for all of them.")
    zero_stage: ZeroStage = _same(DeepSpeedConfig, "zero_stage")
    compile_blocks: bool = _same(DeepSpeedConfig, "compile_blocks")
    max_failures: int = _same(StageConfig, "max_failures")


class TrackingSpec(Strict):
    """Where runs, tables and models are recorded. storage_path is Ray Train's checkpoint storage
    (a local folder or s3://bucket/prefix); artifacts go wherever the MLflow server sends them."""

    tracking_uri: str | None = Field(None, description="Default: sqlite:///<work_dir>/mlflow.db")
    experiment: str = "bitmixer"
    storage_path: str | None = Field(None, description="Default: <work_dir>/ray_results")
    registered_model_prefix: str = Field("bitmixer", description="Registered models are named "
                                         "<prefix>-<pipeline name>-<architecture>.")
    register_models: bool = True
    analysis_plots: bool = Field(True, description="Log Fig. 3/6/7 of each architecture's final Stage III model.")
    analysis_eigenvalues: bool = Field(False, description="With table6 off, also Fig. 4 (sub-net search) and Fig. 5 "
                                       "(Hessian power iteration; ~5 s on resnet_tiny on CPU, much more on "
                                       "ResNet-18) from a search on the plots' own batches.")
    table6: bool = Field(True, description="Table 6: the section 4.2 sub-net search on each architecture's final "
                         "model (top-k by Hessian score against random assignments of the same average bits); "
                         "it also draws that model's Fig. 4 and Fig. 5.")


    @field_validator("storage_path")
    @classmethod
    def _storage_scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_storage_path(value)

    @field_validator("registered_model_prefix")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not re.fullmatch(MODEL_NAME, value):
            raise ValueError(f"{value!r} cannot start a registered-model name: use letters, digits, '_', '.' and "
                             f"'-' only, starting with a letter or digit (MLflow refuses '/' and ':')")
        return value


MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class PipelineConfig(Strict):
    """The whole run: every architecture's chain, its sweep, baselines and ablations, and the tables."""

    name: str = Field(pattern=rf"^{MODEL_NAME}$", description="Part of run and registered-model names.")
    work_dir: str | None = Field(None, description="Default: runs/<name> under the current folder.")
    seed: int = 0
    seeds: list[int] | None = Field(None, min_length=1, description="Train every chain once per seed (the first "
                                    "replaces `seed`); the tables then print mean ± std over the seeds.")
    data: DataSpec
    bits: BitsSpec = Field(default_factory=BitsSpec)
    architectures: list[ArchitectureSpec] = Field(min_length=1)
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    ablations: AblationsSpec = Field(default_factory=AblationsSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, raw: Any) -> Any:
        # A top-level `stages:` block is the default of every architecture; an architecture's own
        # `stages:` overrides it key by key. Merged before validation so errors name the architecture.
        if isinstance(raw, dict) and "stages" in raw:
            raw = dict(raw)
            defaults = raw.pop("stages")
            archs = raw.get("architectures")
            if isinstance(defaults, dict) and isinstance(archs, list):
                raw["architectures"] = [
                    {**a, "stages": _deep_merge(defaults, a.get("stages") or {})} if isinstance(a, dict) else a
                    for a in archs]
            elif not isinstance(defaults, dict):
                raise ValueError("stages must be a mapping of zero/one/two/three to stage settings")
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds lists {self.seeds}; each seed may appear once")
        names = [a.name for a in self.architectures]
        if len(set(names)) != len(names):
            raise ValueError(f"architectures lists {names}; each architecture may appear once")
        for i, arch in enumerate(self.architectures):
            for field in ("teacher", "stage_three_teacher"):
                value = getattr(self.distillation, field)
                if value == "fp32" and not arch.stages.zero.enabled:
                    raise ValueError(f"distillation.{field} is fp32 but architectures[{i}] ({arch.name}) has "
                                     f"stages.zero.enabled false; enable stage zero (the FP32 teacher)")
                if value == "stage_one" and not arch.stages.one.enabled:
                    raise ValueError(f"distillation.{field} is stage_one but architectures[{i}] ({arch.name}) "
                                     f"does not run stage one")
        for field, value in (("ablations.architecture", self.ablations.architecture),
                             *((f"baselines.independent.architectures", n)
                               for n in self.baselines.independent.architectures or [])):
            if value is not None and value not in names:
                raise ValueError(f"{field} names {value!r}, which is not among the architectures {names}")
        if self.ablations.teachers and not self.ablation_arch.stages.zero.enabled:
            raise ValueError("ablations.teachers needs the FP32 teacher: enable stages.zero for "
                             f"{self.ablation_arch.name}")
        if self.scaling.use_gpu and self.scaling.gpus_per_worker == 0:
            self.scaling.gpus_per_worker = 1.0
        return self

    @property
    def ablation_arch(self) -> ArchitectureSpec:
        name = self.ablations.architecture or self.architectures[0].name
        return next(a for a in self.architectures if a.name == name)

    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir or Path("runs") / self.name).resolve()

    def resolved_tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{self.resolved_work_dir() / 'mlflow.db'}"

    def resolved_storage_path(self) -> str:
        return self.tracking.storage_path or str(self.resolved_work_dir() / "ray_results")


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class PipelineConfigError(ValueError):
    """A pipeline config that cannot run; the message names the path of every bad entry."""


def format_location(loc: tuple) -> str:
    """('architectures', 0, 'stages', 'two', 'epochs') -> 'architectures[0].stages.two.epochs'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "literal[")):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _describe(errors: list[dict], source: str) -> str:
    lines = []
    for err in errors:
        where = format_location(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known setting (remove it or check its spelling)"
        elif err["type"] == "missing":
            msg = "is required but missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{where}: {msg}")
    return f"{source} is not a valid pipeline config; fix these entries and run again:\n  " + "\n  ".join(lines)


def parse_pipeline_config(raw: Any, source: str = "the config") -> PipelineConfig:
    """Validate an already-parsed mapping (what `yaml.safe_load` returned)."""
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{source} must be a YAML mapping of settings, not {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise PipelineConfigError(_describe(exc.errors(include_url=False), source)) from None


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error instead of the last one
    silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(str(key), key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Parse one YAML file; `extends: other.yaml` (relative to this file) is read first and this
    file's keys override it, mappings key by key, lists as a whole."""
    if not path.is_file():
        hint = f" (named by `extends` in {seen[-1]})" if seen else ""
        raise PipelineConfigError(f"pipeline config {path}{hint} does not exist; pass a YAML file such as "
                                  f"pipelines/configs/embedded.yaml")
    if path.resolve() in seen:
        raise PipelineConfigError(f"{path} extends itself through {' -> '.join(map(str, seen))}; "
                                  f"break the cycle of `extends`")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except DuplicateKey as exc:
        raise PipelineConfigError(f"{path}:{exc.line} sets `{exc.key}` twice in the same mapping (first on line "
                                  f"{exc.first_line}); keep one of them") from None
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"{path} is not valid YAML ({exc}); fix the syntax and run again") from None
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path} must be a YAML mapping of settings, not {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base = _read_yaml(path.parent / str(base_name), seen + (path.resolve(),))
    return _deep_merge(base, raw)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML; every problem is reported with its path in the file."""
    path = Path(path)
    return parse_pipeline_config(_read_yaml(path), source=str(path))


def dump_pipeline_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (logged with the pipeline run, like ffcv-imagenet's params.json)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
