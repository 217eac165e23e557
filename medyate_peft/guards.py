"""Non-finite values caught where they appear, with the layer and channels that hold them.

The sparse backward already reduces each selected layer's compact gradient to per-channel norms
and moves them to the CPU for the norm tracker, so checking them costs nothing extra. A NaN/inf
found there stops the step before the optimizer spreads it into the trained weights.
"""

from __future__ import annotations

import torch

HINT = (
    "Lower the learning rate, check the inputs and the loss (tuner.check_finite(loss)), or resume from "
    "the last checkpoint. Under fp16 with a GradScaler, which skips such steps itself, set "
    "MeDyateConfig(detect_anomalies=False)."
)


class NonFiniteError(FloatingPointError):
    """A loss, gradient or trained value is NaN or infinite."""


def check_finite(value: torch.Tensor | float, what: str) -> None:
    """Raise NonFiniteError naming `what` if `value` holds a NaN or an infinity."""
    tensor = torch.as_tensor(value)
    if not bool(torch.isfinite(tensor).all()):
        shown = f" = {tensor.item()}" if tensor.numel() == 1 else ""
        raise NonFiniteError(f"{what}{shown} is not finite. {HINT}")


def check_channel_gradients(layer: str, channels: torch.Tensor, norms: torch.Tensor, epoch: int) -> None:
    """`norms[j]` is the gradient norm of input channel `channels[j]` of `layer` (CPU tensors)."""
    bad = ~torch.isfinite(norms)
    if not bool(bad.any()):
        return
    if bool(bad.all()):
        where = (
            f"all {len(channels)} selected input channels; most likely the gradient reaching this layer from "
            "the layers after it (or the loss) is already non-finite"
        )
    else:
        where = (
            f"input channels {channels[bad].tolist()[:10]} of {len(channels)} selected; most likely this layer's "
            "input activations hold NaN/inf (or overflow) on those channels"
        )
    raise NonFiniteError(f"non-finite weight gradient in layer {layer!r} (epoch {epoch}) on {where}. {HINT}")


def check_trained_values(layer: str, values: torch.Tensor, epoch: int) -> None:
    """Before folding an epoch's trained values into the deltas: refuse NaN/inf."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"the values trained in layer {layer!r} during epoch {epoch} are not finite; they were not folded "
            f"into the adapter, whose earlier epochs are intact. {HINT}"
        )
