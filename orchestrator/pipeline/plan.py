"""From a PipelineConfig to the graph of stages to run: one `StageNode` per training stage.

A node says what to train (a full engine `StageConfig`), whose model it starts from (`init_after`) and
whose model teaches it (`teacher_after`); the runner fills `init_from` / `distill.teacher_uri` from those
nodes' results when they are done. Building the plan builds every StageConfig, so a combination the engine
refuses (a batch that does not split over the workers, a fixed bit-width outside the bit set) is reported
before Ray starts.

A node's stage is a key of the core's stages (bitmixer_core.STAGES: fp32, one, two, three, independent); the
YAML's stage sections (zero = the FP32 teacher, one, two, three) map to them in SECTION_STAGE, the only place.

Chains ("variants") per architecture, in the paper's words:
  main                  [fp32,] one -> two -> three (three = the Tune sweep when enabled; fp32 = the teacher)
  independent_<b>       one Independent network at fixed b bits, from main's Stage I, as long as Stage II
                        (Table 7); with `one_train_run`, those from the same Stage I share a Train run
  no_transitional_bn    three from main's Stage II, one BN per bit-width of the current layer (Table 1)
  teacher_<t>           two -> three from main's Stage I with another teacher (Table 2)
  bits_4321             its own one -> two with bit set {1,2,3,4} (Table 3; Stage III did not converge)
  ternary_binary        its own one -> two -> three, activations {2,3,4} / weights {1,3,4} (Table 4)
  asymmetric[_round]    its own one -> two with the quantizer variant (Table 5)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from orchestrator.engine.config import (DeepSpeedConfig, DistillConfig, ModelConfig, OptimConfig, PolicyConfig,
                                        ScalingConfig, StageConfig, check_side_by_side,
                                        side_by_side_signature)
from orchestrator.pipeline.config import (ArchitectureSpec, PipelineConfig, PipelineConfigError, StageSpec,
                                          StageThreeSpec, format_location)
from orchestrator.tracking.config import TrackingConfig

# The YAML's stage sections (zero = the optional FP32 teacher) -> the core's Stage keys (bitmixer_core.STAGES).
SECTION_STAGE = {"zero": "fp32", "one": "one", "two": "two", "three": "three"}


def stage_short(section: str) -> str:
    """The short name of a stage section in run and metric names (core Stage.short): "three" -> "stage3"."""
    from bitmixer_core import get_stage
    return get_stage(SECTION_STAGE.get(section, section)).short


def run_name(stage: str, arch: str, variant: str) -> str:
    """The MLflow run name: stage first, then the architecture, then what differs from the main chain
    ("stage3 resnet18", "stage3 resnet18 no_transitional_bn", "indep resnet18 4bit")."""
    if variant.startswith("independent_"):
        return f"indep {arch} {variant.removeprefix('independent_')}bit"
    return " ".join([stage_short(stage), arch] + ([] if variant == "main" else [variant]))


@dataclass(frozen=True)
class StageNode:
    key: str                       # "<arch>/<variant>/<stage>", unique in the plan
    arch: str
    variant: str
    stage: str                     # a core Stage key: fp32 / one / two / three / independent
    config: StageConfig            # init_from / teacher_uri are filled in by the runner
    init_after: str | None = None  # key of the node whose model this one starts from
    teacher_after: str | None = None
    sweep: bool = False            # Stage III of the main chain run as a Ray Tune sweep
    replica: bool = False          # the same stage under another of the pipeline's seeds
    train_run: str | None = None   # nodes with the same value train side by side in one Train run


@dataclass
class Plan:
    nodes: dict[str, StageNode] = field(default_factory=dict)

    def add(self, node: StageNode) -> None:
        self.nodes[node.key] = node

    def upstream(self, node: StageNode) -> list[str]:
        return [k for k in (node.init_after, node.teacher_after) if k is not None]

    def train_runs(self) -> list[list[StageNode]]:
        """The nodes in order, those that share a `train_run` together at the place of the first of them
        (every node a member depends on comes before the first: members only depend on earlier nodes)."""
        runs: dict[str, list[StageNode]] = {}
        for node in self.order():
            runs.setdefault(node.train_run or node.key, []).append(node)
        return list(runs.values())

    def order(self) -> list[StageNode]:
        """Nodes with every dependency before them (insertion order already is; checked here)."""
        seen: set[str] = set()
        for node in self.nodes.values():
            missing = [k for k in self.upstream(node) if k not in seen]
            assert not missing, f"{node.key} listed before {missing}"
            seen.add(node.key)
        return list(self.nodes.values())


def _key(arch: str, variant: str, stage: str) -> str:
    return f"{arch}/{variant}/{stage}"


class _Builder:
    def __init__(self, cfg: PipelineConfig, data_path: str, experiment: str, tracking_uri: str):
        self.cfg, self.plan = cfg, Plan()
        self.data = cfg.data.loader_config(data_path)
        self.tracking = TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
        self.storage = cfg.resolved_storage_path()

    def model(self, arch: ArchitectureSpec, *, bits: tuple[list[int], list[int]] | None = None,
              **overrides) -> ModelConfig:
        weights, activations = bits or (self.cfg.bits.weights, self.cfg.bits.activations)
        options = dict(name=arch.name, num_classes=self.cfg.data.num_classes, bits_weights=list(weights),
                       bits_activations=list(activations), stem=arch.stem, first_last=arch.first_last,
                       bn=arch.bn, block_order=arch.block_order, rounding=arch.quantizer.rounding,
                       symmetric=arch.quantizer.symmetric,
                       nesting=arch.quantizer.nesting)
        return ModelConfig(**{**options, **overrides})

    def stage_config(self, *, name: str, model: ModelConfig, spec: StageSpec, policy: PolicyConfig,
                     teacher: bool, title: str) -> StageConfig:
        d = self.cfg.distillation
        return StageConfig(
            name=name, model=model, data=self.data,
            optim=spec.optim(),
            policy=policy,
            # teacher_uri is a placeholder until the teacher's stage is done (the runner replaces it).
            distill=DistillConfig(teacher="path", teacher_uri="pending", temperature=d.temperature,
                                  weight=d.weight) if teacher else DistillConfig(),
            deepspeed=DeepSpeedConfig(zero_stage=self.cfg.scaling.zero_stage,
                                      compile_blocks=self.cfg.scaling.compile_blocks),
            scaling=ScalingConfig(**self.cfg.scaling.model_dump(include=set(ScalingConfig.model_fields))),
            tracking=self.tracking.model_copy(update={"run_name": title}),
            eval_every_epochs=spec.eval_every, seed=self.cfg.seed, storage_path=self.storage,
            max_failures=self.cfg.scaling.max_failures)

    def chain(self, arch: ArchitectureSpec, variant: str, stages: list[str], *, model: ModelConfig,
              teacher: str, start_after: str | None = None, teacher_three: str | None = None) -> None:
        """Add `stages` (YAML sections) of one chain. The FP32 network (zero) is only a teacher: Stage I starts from scratch in
        every chain, so that chains whose layers differ (shared BN, other bit sets) compare fairly. Stage II
        learns from `teacher`, Stage III from `teacher_three` (default: the same)."""
        previous = start_after
        for stage in stages:
            spec: StageSpec = getattr(arch.stages, stage)
            core_stage = SECTION_STAGE[stage]  # the YAML section's core Stage key
            policy = PolicyConfig(stage=core_stage)
            if isinstance(spec, StageThreeSpec):
                policy = PolicyConfig(stage="three", k=spec.k, ramp_epochs=spec.ramp_epochs,
                                      ramp_shape=spec.ramp_shape, granularity=spec.granularity)
            stage_teacher = (teacher_three or teacher) if stage == "three" else teacher
            teacher_key = self.teacher_key(arch, variant, stage_teacher) if stage in ("two", "three") else None
            key = _key(arch.name, variant, core_stage)
            self.plan.add(StageNode(
                key=key, arch=arch.name, variant=variant, stage=core_stage,
                config=self.stage_config(name=f"{arch.name}-{variant}-{stage}", model=model, spec=spec,
                                         policy=policy, teacher=teacher_key is not None,
                                         title=run_name(stage, arch.name, variant)),
                init_after=None if stage in ("zero", "one") else previous, teacher_after=teacher_key,
                sweep=(variant == "main" and stage == "three" and self.cfg.sweep.enabled)))
            previous = key

    def teachers(self) -> dict:
        """The teachers of Stages II and III in the main chain and in every ablation of the main method."""
        d = self.cfg.distillation
        return {"teacher": d.teacher, "teacher_three": d.stage_three_teacher}

    def teacher_key(self, arch: ArchitectureSpec, variant: str, teacher: str) -> str | None:
        if teacher == "fp32":
            return _key(arch.name, "main", "fp32")
        if teacher == "stage_one":
            own = _key(arch.name, variant, "one")
            return own if own in self.plan.nodes else _key(arch.name, "main", "one")
        return None

    def build(self) -> Plan:
        cfg = self.cfg
        for arch in cfg.architectures:
            stages = [s for s in ("zero", "one", "two", "three") if getattr(arch.stages, s).enabled]
            self.chain(arch, "main", stages, model=self.model(arch), **self.teachers())
        if cfg.ablations.any:
            stages = cfg.ablation_arch.stages
            self.ablations([s for s in ("one", "two", "three") if getattr(stages, s).enabled])
        self.independent()  # last: a 1-bit network starts from the 4-3-2-1 chain's Stage I
        self.share_train_runs()
        self.replicate_over_seeds()
        return self.plan

    def share_train_runs(self) -> None:
        """Mark the nodes that train side by side in one Train run (`train_run`): with
        baselines.independent.one_train_run, an architecture's Independent networks that start from the same
        Stage I; with scaling.pack_architectures, each main-chain stage of every architecture (not a Tune
        sweep). Only stages that can share a run (same workers, data, epochs, storage) are put together."""
        for key, node in self.plan.nodes.items():
            if node.stage == "independent" and self.cfg.baselines.independent.one_train_run:
                shared = f"{node.arch}/independent<-{node.init_after}"
            elif node.variant == "main" and not node.sweep and self.cfg.scaling.pack_architectures:
                shared = f"main/{node.stage}"
            else:
                continue
            self.plan.nodes[key] = replace(node, train_run=f"{shared} [{side_by_side_signature(node.config)}]")

    def replicate_over_seeds(self) -> None:
        """`seeds: [s0, s1, ...]`: the plan built with s0 is repeated for every other seed, each copy keyed
        `<key>@seed<s>` and starting from (and learning from) its own seed's models."""
        seeds = self.cfg.seeds or [self.cfg.seed]
        first = list(self.plan.nodes.values())
        for node in first:
            self.plan.nodes[node.key] = replace(node, config=_with_seed(node.config, seeds[0], suffix=False))
        for seed in seeds[1:]:
            copy = lambda key: None if key is None else f"{key}@seed{seed}"  # noqa: E731
            for node in first:
                self.plan.add(replace(node, key=copy(node.key), init_after=copy(node.init_after),
                                      teacher_after=copy(node.teacher_after), train_run=copy(node.train_run),
                                      replica=True,
                                      config=_with_seed(node.config, seed, suffix=True)))

    def independent(self) -> None:
        spec = self.cfg.baselines.independent
        if not spec.enabled:
            return
        bits = spec.bits or sorted(self.cfg.bits.activations, reverse=True)
        if spec.bits is None and self.cfg.ablations.bits_4321:
            bits = sorted(set(bits) | {1}, reverse=True)  # Table 3 compares against a 1-bit network too
        for arch in self.cfg.architectures:
            if spec.architectures is not None and arch.name not in spec.architectures:
                continue
            for b in bits:
                # A bit-width outside the main bit set (1 for Table 3) starts from the 4-3-2-1 Stage I.
                source = "main" if b in self.cfg.bits.activations else "bits_4321"
                model = self.model(arch) if source == "main" else self.model(arch, bits=([1, 2, 3, 4],) * 2)
                name = f"{arch.name}-independent_{b}"
                variant = f"independent_{b}"
                self.plan.add(StageNode(
                    key=_key(arch.name, variant, "independent"), arch=arch.name, variant=variant, stage="independent",
                    config=self.stage_config(name=name, model=model, spec=arch.stages.two,
                                             policy=PolicyConfig(stage="independent", fixed_bits=b), teacher=False,
                                             title=run_name("independent", arch.name, variant)),
                    init_after=_key(arch.name, source, "one")))

    def ablations(self, quantized: list[str]) -> None:
        a, arch = self.cfg.ablations, self.cfg.ablation_arch
        teachers = self.teachers()
        upto_two = [s for s in quantized if s != "three"]
        if a.bits_4321:
            self.chain(arch, "bits_4321", upto_two, model=self.model(arch, bits=([1, 2, 3, 4],) * 2),
                       **teachers)
        if a.no_transitional_bn and "three" in quantized:
            # Table 1 (section 4.1): Stage III started from the main Stage II model, with one BN per
            # bit-width of the current layer instead of one per (previous, current) pair.
            self.chain(arch, "no_transitional_bn", ["three"], model=self.model(arch, bn="per_bit"), **teachers,
                       start_after=_key(arch.name, "main", "two"))
        if a.teachers:
            for other in ("none", "stage_one", "fp32"):
                if other != teachers["teacher"] or (teachers["teacher_three"] or other) != other:
                    self.chain(arch, f"teacher_{other}", [s for s in quantized if s != "one"],
                               model=self.model(arch), teacher=other, start_after=_key(arch.name, "main", "one"))
        if a.ternary_binary:
            self.chain(arch, "ternary_binary", quantized, model=self.model(arch, bits=([1, 3, 4], [2, 3, 4])),
                       **teachers)
        if a.quantizers:
            self.chain(arch, "asymmetric", upto_two, model=self.model(arch, symmetric=False), **teachers)
            self.chain(arch, "asymmetric_round", upto_two,
                       model=self.model(arch, symmetric=False, rounding="round"), **teachers)


def _with_seed(config: StageConfig, seed: int, *, suffix: bool) -> StageConfig:
    """The stage under run seed `seed` (weights init and sub-net draws); a replica's names say which."""
    if not suffix:
        return config.model_copy(update={"seed": seed})
    title = f"{config.tracking.run_name or config.name} seed{seed}"
    return config.model_copy(update={"seed": seed, "name": f"{config.name}-seed{seed}",
                                     "tracking": config.tracking.model_copy(update={"run_name": title})})


def build_plan(cfg: PipelineConfig, *, data_path: str | Path, tracking_uri: str | None = None) -> Plan:
    """Every stage of the pipeline as engine StageConfigs; an inconsistency the engine's config refuses is
    reported as a PipelineConfigError naming the stage, before anything runs."""
    builder = _Builder(cfg, str(data_path), cfg.tracking.experiment, tracking_uri or cfg.resolved_tracking_uri())
    try:
        plan = builder.build()
    except ValidationError as exc:
        errors = "; ".join(f"{format_location(tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                           for e in exc.errors(include_url=False))
        raise PipelineConfigError(f"the pipeline config yields a stage the engine refuses ({errors}); "
                                  f"change the config so that this holds") from None
    for node in plan.nodes.values():
        for dep in plan.upstream(node):
            if dep not in plan.nodes:
                raise PipelineConfigError(f"stage {node.key} needs {dep}, which the config does not run; "
                                          f"enable that stage")
    for members in plan.train_runs():  # grouped by what they share, so this holds by construction
        check_side_by_side([node.config for node in members])
    return plan
