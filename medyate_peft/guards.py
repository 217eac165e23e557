"""Non-finite values caught where they appear, with the layer and channels that hold them.

The sparse backward already reduces each selected layer's compact gradient to per-channel norms
for the norm tracker, so checking them costs no extra pass; what costs is reading the answer on
the host, which waits for the device. On the CPU that wait is free: the check runs in the backward
that produced the gradient and stops the step before the optimizer spreads a NaN/inf into the
trained weights. On an accelerator (CUDA, ...) a flag accumulates on the device and is read every
`DEVICE_CHECK_EVERY` backwards and at `resample()` (`ChannelGradientWatch`): the error may then
come some steps late, still naming the layer and channels of the first bad backward, and before
anything is folded into the adapter.
"""

from __future__ import annotations

from typing import Any

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


CHECK_EVERY = {"cpu": 1}  # backwards between host reads of the non-finite flag, per device type
DEVICE_CHECK_EVERY = 32  # other device types: one wait for the device per 32 steps, not one per step


class ChannelGradientWatch:
    """Non-finite channel-gradient norms noted on their device, read on the host every few backwards.

    Until a check, it holds a device flag (any NaN/inf since the last check) and the norms of the
    first backward that had one (one float per selected channel), so the error names what the
    immediate check would have named.
    """

    def __init__(self) -> None:
        self._pending: list | None = None  # [layout, flag, first bad norms, epoch]
        self.backwards = 0

    def note(self, layout: Any, norms: torch.Tensor, finite: torch.Tensor, epoch: int) -> None:
        """One backward's norms (`layout`: names and channels per layer, in vector order); no host sync
        except at a check."""
        if self._pending is not None and self._pending[0] is not layout:
            self.check()  # a new selection: the held norms belong to the old one
        bad = ~finite.all()
        if self._pending is None:
            self._pending = [layout, bad, norms, epoch]
        else:
            held = self._pending
            held[2] = torch.where(held[1], held[2], norms)  # the first bad backward's norms are kept
            held[1] = held[1] | bad
        self.backwards += 1
        if self.backwards % CHECK_EVERY.get(norms.device.type, DEVICE_CHECK_EVERY) == 0:
            self.check()

    def check(self) -> None:
        """Read the flag on the host (one sync) and raise NonFiniteError if a noted gradient was not finite."""
        held, self._pending = self._pending, None
        if held is None or not bool(held[1]):
            return
        layout, _, norms, epoch = held
        per_layer = zip(layout.names, layout.channels, norms.split([len(c) for c in layout.channels]), strict=True)
        for name, channels, layer_norms in reversed(list(per_layer)):  # in backward's order
            check_channel_gradients(name, channels, layer_norms.cpu().to(torch.float64), epoch)
