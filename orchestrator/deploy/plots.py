"""The paper's deployment and analysis figures as matplotlib Figures (no display needed), and their logging.

- ``subnet_figures``: top-1 against average bits and against BitOPs for the searched, random and fixed
  sub-nets (Fig. 4).
- ``tbn_variance_figure``: per-channel variance of the features entering and leaving one Transitional BN,
  at each fixed bit-width (Fig. 3).
- ``eigenvalue_figure``: per-layer top Hessian eigenvalue (Fig. 5).
- ``weight_distribution_figure``: one layer's weights at each weight bit-width (Fig. 6).
- ``step_size_figure``: weight and activation step size per layer and bit-width (Fig. 7).
- ``log_analysis_plots(model, batches, target)``: Fig. 3, 5, 6, 7 as PNGs in an MLflow run.

Every figure's title names the paper's figure ("Fig. N") and, when a ``caption`` is given, what it shows it
for (architecture, stage, run); every axis is labelled. Figures are built with ``matplotlib.figure.Figure``
directly (Agg canvas): no pyplot state, safe in workers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

import bitmixer_core as core
from bitmixer_core.sensitivity import PowerIterationOptions, layer_sensitivities

from .mlflow_log import log_figures

COLOURS = {"top": "tab:blue", "random": "tab:grey", "fixed": "tab:red"}


def _title(fig: Figure, figure: str, what: str, caption: str) -> None:
    """The figure's own title: "Fig. N: what", and on a second line what it is of (architecture, stage, run)."""
    fig.suptitle(f"{figure}: {what}" + (f"\n{caption}" if caption else ""), fontsize=10)


def subnet_figures(report, caption: str = "") -> dict[str, Figure]:
    """Fig. 4: accuracy of the evaluated sub-nets against average bits, and against BitOPs."""
    figures = {}
    for axis, xlabel, name in (("average_bits", "average bit-width", "subnets_top1_vs_average_bits.png"),
                               ("bitops", "BitOPs per image (log scale)", "subnets_top1_vs_bitops.png")):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        for kind, label in (("random", "random, same total bits"), ("top", "top-k by score"), ("fixed", "fixed bit-width")):
            pts = [s for s in report.subnets if s.kind == kind]
            if pts:
                ax.scatter([getattr(s, axis) for s in pts], [s.top1 for s in pts], s=22 if kind != "fixed" else 50,
                           c=COLOURS[kind], marker="x" if kind == "fixed" else "o", alpha=0.8, label=label)
        if axis == "bitops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        _title(fig, "Fig. 4", f"sub-nets of the meta-network, top-1 vs. {xlabel.split(' (')[0]}", caption)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures[name] = fig
    return figures


def _first_inner_tbn(model: nn.Module) -> tuple[str, core.TransitionalBatchNorm2d]:
    """A Transitional BN with switchable quantized layers on both sides (the interesting transitions)."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, core.TransitionalBatchNorm2d)]
    for name, bn in candidates:
        if len(bn.previous_bits) > 1 and len(bn.next_bits) > 1:
            return name, bn
    if not candidates:
        raise ValueError("the model has no Transitional BN layer to analyse.")
    return candidates[0]


@torch.no_grad()
def tbn_variance_figure(model: nn.Module, images: torch.Tensor, caption: str = "") -> Figure:
    """Fig. 3: per-channel variance before and after a Transitional BN, at each fixed bit-width."""
    name, bn = _first_inner_tbn(model)
    bit_choices = core.quantized_layers(model)[0][1].bit_widths.activations
    seen: dict[str, torch.Tensor] = {}
    hook = bn.register_forward_hook(lambda m, i, o: seen.update(before=i[0], after=o))
    saved, was_training = core.get_bits(model), model.training
    fig = Figure(figsize=(4 * len(bit_choices), 3.8), dpi=100)
    try:
        model.eval()
        for k, b in enumerate(bit_choices):
            core.set_bits(model, b)
            model(images)
            ax = fig.add_subplot(1, len(bit_choices), k + 1)
            for key, colour in (("before", "tab:orange"), ("after", "tab:blue")):
                var = seen[key].transpose(0, 1).flatten(1).var(dim=1)
                ax.plot(var.numpy(), color=colour, label=f"{key} TBN")
            ax.set_yscale("log")
            ax.set_title(f"{name}, {b} bits")
            ax.set_xlabel("channel")
            ax.grid(alpha=0.3)
        fig.axes[0].set_ylabel("per-channel variance (log scale)")
        fig.axes[0].legend(fontsize=8)
    finally:
        hook.remove()
        core.set_bits(model, saved)
        model.train(was_training)
    _title(fig, "Fig. 3", "feature variance before and after a Transitional BN, per bit-width", caption)
    fig.tight_layout()
    return fig


def eigenvalue_figure(layer_names: Sequence[str], eigenvalues: Sequence[float], caption: str = "") -> Figure:
    """Fig. 5: the top Hessian eigenvalue of each quantized layer, forward order."""
    fig = Figure(figsize=(max(6, 0.35 * len(layer_names)), 4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(eigenvalues)), eigenvalues, color="tab:blue")
    ax.set_xticks(range(len(layer_names)), layer_names, rotation=80, fontsize=7)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_xlabel("quantized layer (forward order)")
    _title(fig, "Fig. 5", "layer sensitivity at the highest bit-width", caption)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


@torch.no_grad()
def weight_distribution_figure(model: nn.Module, layer_name: str | None = None, caption: str = "") -> Figure:
    """Fig. 6: histogram of one layer's quantized weights at each weight bit-width (and the real weights)."""
    layers = dict(core.quantized_layers(model))
    name = layer_name or list(layers)[len(layers) // 2]
    layer = layers[name]
    saved = layer.bits
    bit_choices = layer.bit_widths.activations
    fig = Figure(figsize=(3.2 * (len(bit_choices) + 1), 3.6), dpi=100)
    ax = fig.add_subplot(1, len(bit_choices) + 1, 1)
    ax.hist(layer.weight.detach().flatten().numpy(), bins=60, color="tab:grey")
    ax.set_title(f"{name}: real weights", fontsize=9)
    ax.set_ylabel("number of weights")
    ax.set_xlabel("weight value")
    try:
        for k, b in enumerate(bit_choices):
            layer.set_bit_width(b)
            values = layer.quantized_weight().detach().flatten().numpy()
            ax = fig.add_subplot(1, len(bit_choices) + 1, k + 2)
            ax.hist(values, bins=60, color="tab:blue")
            ax.set_title(f"W{layer.weight_bits} (A{b})", fontsize=9)
            ax.set_xlabel("quantized weight value")
    finally:
        layer.set_bit_width(saved)
    _title(fig, "Fig. 6", f"weight distribution of {name} at each bit-width", caption)
    fig.tight_layout()
    return fig


def step_size_figure(model: nn.Module, caption: str = "") -> Figure:
    """Fig. 7: the learned step size of every quantized layer at every bit-width, weights and activations."""
    layers = core.quantized_layers(model)
    fig = Figure(figsize=(max(8, 0.5 * len(layers)), 4), dpi=100)
    for k, (attr, title) in enumerate((("weight_step_size", "weights"), ("activation_step_size", "activations"))):
        ax = fig.add_subplot(1, 2, k + 1)
        steps = torch.stack([getattr(m, attr).detach() for _, m in layers])  # (layers, bit-widths)
        bit_set = layers[0][1].bit_widths
        labels = bit_set.weights if attr == "weight_step_size" else bit_set.activations
        for j, b in enumerate(labels):
            ax.plot(steps[:, j].numpy(), marker="o", label=f"{b} bits")
        ax.set_xlabel("quantized layer (forward order)")
        ax.set_ylabel("step size alpha")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _title(fig, "Fig. 7", "learned step sizes per layer and bit-width", caption)
    fig.tight_layout()
    return fig


def analysis_figures(model: nn.Module, batches: Sequence, *, eigenvalues: dict[str, float] | None = None,
                     options: PowerIterationOptions = PowerIterationOptions(max_iterations=20),
                     caption: str = "") -> dict[str, Figure]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one (images, labels) batch for the analysis plots.")
    if eigenvalues is None:
        eigenvalues = layer_sensitivities(model, batches[:2], options)
    return {
        "fig3_tbn_variance.png": tbn_variance_figure(model, batches[0][0], caption),
        "fig5_layer_eigenvalues.png": eigenvalue_figure(list(eigenvalues), list(eigenvalues.values()), caption),
        "fig6_weight_distributions.png": weight_distribution_figure(model, caption=caption),
        "fig7_step_sizes.png": step_size_figure(model, caption),
    }


def log_analysis_plots(model: nn.Module, batches: Sequence, mlflow_client_or_run, *,
                       eigenvalues: dict[str, float] | None = None, artifact_dir: str = "analysis") -> list[str]:
    """Fig. 3, 5, 6 and 7 of a trained model as PNGs under ``artifact_dir`` of an MLflow run.

    ``mlflow_client_or_run``: an active run / Run, a run id, or ``(MlflowClient, run_id)``. Returns the
    artifact paths. Eigenvalues are computed (a short power iteration on the first two batches) unless given.
    """
    return log_figures(mlflow_client_or_run, analysis_figures(model, batches, eigenvalues=eigenvalues), artifact_dir)
