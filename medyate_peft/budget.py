"""Memory accounting of the papers (spec section 2): element slots per training sample.

A channel's cost is the weight-gradient elements of its slice plus the input-activation elements
that the backward pass must keep for it. Biases, the classifier, masks and optimizer state are not
counted here (as in the papers); what a real step holds beside this is measured in `measure.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .candidates import linear_features


@dataclass(frozen=True)
class LayerCost:
    """Per-input-channel costs of one Conv2d/Linear layer, in slots for one sample."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel_elems: int  # kh * kw (1 for Linear)
    activation_slots: int  # H_in * W_in (conv) or tokens per sample (linear)

    @property
    def weight_slots(self) -> int:
        """C^W: elements of the weight slice W[:, c] of one input channel."""
        return (self.out_channels // self.groups) * self.kernel_elems

    @property
    def channel_slots(self) -> int:
        """cost(i, c) = C^W + C^A."""
        return self.weight_slots + self.activation_slots

    @property
    def layer_slots(self) -> int:
        """Cost of training every input channel of the layer."""
        return self.in_channels * self.channel_slots


def budget_slots(budget_kb: float, bytes_per_slot: int) -> int:
    """Budget in slots; kB means KiB as in the papers (27,946 fp32 slots = 110 kB for MbV2)."""
    return int(math.floor(budget_kb * 1024 / bytes_per_slot))


def slots_to_kb(slots: int, bytes_per_slot: int) -> float:
    return slots * bytes_per_slot / 1024


def weight_slots_per_channel(layer: nn.Module) -> int:
    """C^W from the weight shape alone (no activation shape needed)."""
    if isinstance(layer, nn.Conv2d):
        return (layer.out_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
    features = linear_features(layer)
    if features is not None:
        return features[1]
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def activation_positions(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(positions of one input channel in the whole observed input, the layer's leading dim).

    Positions are N*H_in*W_in (conv) or every token (linear); the leading dim is the batch only if
    the layer sees the model's samples unchanged (Swin's window attention sees windows*B).
    """
    if isinstance(layer, nn.Conv2d):
        return x.numel() // x.shape[-3], (x.shape[0] if x.dim() == 4 else 1)
    return x.numel() // x.shape[-1], (x.shape[0] if x.dim() > 1 else 1)


def activation_slots_of_input(layer: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> int:
    """C^A for one sample: the input's positions per channel over the model's batch (default: the leading dim)."""
    positions, leading = activation_positions(layer, x)
    return per_sample(positions, batch_size or leading)


def model_batch_size(args: tuple, kwargs: dict, main_input: str | None = None) -> int | None:
    """Samples in a model call: the leading dim of its main input (else of its first tensor); None: no tensor."""
    for value in (kwargs.get(main_input or ""), *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def per_sample(positions: int, batch_size: int) -> int:
    """Positions of a whole batch per sample, rounded up so that the plan never undercounts."""
    return max(1, math.ceil(positions / batch_size))


def layer_cost(name: str, layer: nn.Module, activation_slots: int) -> LayerCost:
    if isinstance(layer, nn.Conv2d):
        return LayerCost(
            name=name,
            kind="conv",
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            groups=layer.groups,
            kernel_elems=layer.kernel_size[0] * layer.kernel_size[1],
            activation_slots=activation_slots,
        )
    features = linear_features(layer)
    if features is not None:
        return LayerCost(
            name=name,
            kind="linear",
            in_channels=features[0],
            out_channels=features[1],
            groups=1,
            kernel_elems=1,
            activation_slots=activation_slots,
        )
    raise TypeError(f"unsupported layer type {type(layer).__name__}")
