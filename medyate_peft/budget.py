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


def activation_slots_of_input(layer: nn.Module, x: torch.Tensor) -> int:
    """C^A for one sample from an observed input batch: H_in*W_in (conv) or tokens (linear)."""
    if isinstance(layer, nn.Conv2d):
        return int(x.shape[-1] * x.shape[-2])
    return int(math.prod(x.shape[1:-1])) if x.dim() > 2 else 1


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
