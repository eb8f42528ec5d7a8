"""The stages of Bit-Mixer training (section 3.3), and the two baselines trained beside them.

A Stage says what it quantizes, how it draws the sub-net of each iteration, what it does to a model it
starts from (`start_from`) and whether it fits activation step sizes to data first (`needs_calibration`). Training code, pipelines and result tables name stages by `Stage.key` and print
`Stage.title`; nothing else keeps its own list of stage names.

| key         | title         | weights   | activations | sub-net of each iteration                        |
|-------------|---------------|-----------|-------------|--------------------------------------------------|
| fp32        | FP32 teacher  | real      | real        | none                                             |
| one         | Stage I       | real      | quantized   | one random b for every layer ("uniform")         |
| two         | Stage II      | quantized | quantized   | one random b for every layer ("uniform")         |
| three       | Stage III     | quantized | quantized   | Stage II draw w.p. sigma, else per layer ("mixed")|
| independent | Independent   | quantized | quantized   | every layer at one fixed b (a network per b)     |
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .assignment import set_quantization
from .bitwidths import BitWidths
from .layers import QuantizedLayerMixin
from .policies import StagePolicy
from .step_sizes import reinitialize_weight_step_sizes
from .transitional_bn import seed_mixed_transitions

SUBNET_DRAWS = ("none", "uniform", "mixed", "fixed")


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    quantize_weights: bool
    quantize_activations: bool
    subnets: str  # one of SUBNET_DRAWS
    short: str = ""  # in run and metric names ("stage3 resnet18", "resnet18/stage3/top1_2bit")

    def set_precision(self, model: nn.Module) -> None:
        """Switch every quantized layer to what this stage quantizes."""
        set_quantization(model, weights=self.quantize_weights, activations=self.quantize_activations)

    def policy(self, bits: BitWidths, *, k: float = 0.75, ramp_epochs: float = 80.0, ramp_shape: str = "linear",
               granularity: str = "layer") -> StagePolicy | None:
        """The random sub-net policy of Stages I-III; None for the stages that draw nothing."""
        number = {"one": 1, "two": 2, "three": 3}.get(self.key)
        if number is None:
            return None
        return StagePolicy(stage=number, bits=bits, k=k, ramp_epochs=ramp_epochs, ramp_shape=ramp_shape,
                           granularity=granularity)

    def start_from(self, model: nn.Module, previous: "Stage") -> list[str]:
        """Prepare a model whose weights come from `previous` for this stage; returns what was done.

        - Weights real before, quantized now (Stage I or FP32 -> II, III, Independent): the weights moved
          since their step sizes were set, so those are fitted again to the current weights.
        - One bit-width for every layer before, mixed now (Stage I or II -> III): only the uniform (i, i)
          Transitional BN entries ever trained, so every mixed (i, j) entry starts from (i, i), whose
          input came from a layer at the same i bits.
        Activation step sizes are not touched: they were fitted to data already (see `needs_calibration`)."""
        done = []
        if self.quantize_weights and not previous.quantize_weights:
            reinitialize_weight_step_sizes(model)
            done.append("weight step sizes fitted to the weights")
        if self.subnets == "mixed" and previous.subnets == "uniform":
            seeded = seed_mixed_transitions(model)
            done.append(f"{seeded} mixed Transitional BN entries seeded from uniform ones")
        return done

    def needs_calibration(self, model: nn.Module) -> bool:
        """Whether this stage must fit activation step sizes to a batch of training data before it trains
        (`calibrate_activation_step_sizes`): it quantizes activations and some step size has never been fitted.
        That is the first quantized stage of a chain (Stage I from scratch or after the FP32 network); the
        stages after it keep the values their predecessor learned, and a resumed stage has them in its
        checkpoint."""
        return self.quantize_activations and not all(
            bool(m.activation_step_initialized.all()) for m in model.modules() if isinstance(m, QuantizedLayerMixin))


FP32 = Stage("fp32", "FP32 teacher", quantize_weights=False, quantize_activations=False, subnets="none", short="fp32")
STAGE_ONE = Stage("one", "Stage I", quantize_weights=False, quantize_activations=True, subnets="uniform",
                  short="stage1")
STAGE_TWO = Stage("two", "Stage II", quantize_weights=True, quantize_activations=True, subnets="uniform",
                  short="stage2")
STAGE_THREE = Stage("three", "Stage III", quantize_weights=True, quantize_activations=True, subnets="mixed",
                    short="stage3")
INDEPENDENT = Stage("independent", "Independent", quantize_weights=True, quantize_activations=True,
                    subnets="fixed", short="indep")

STAGES: dict[str, Stage] = {s.key: s for s in (FP32, STAGE_ONE, STAGE_TWO, STAGE_THREE, INDEPENDENT)}


def get_stage(key: str) -> Stage:
    """The Stage named `key`; a ValueError lists the known ones."""
    try:
        return STAGES[key]
    except KeyError:
        raise ValueError(f"unknown stage {key!r}; choose one of {sorted(STAGES)}.") from None
