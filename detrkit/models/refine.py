# SPDX-License-Identifier: Apache-2.0
"""How decoder layers update their reference boxes
(docs/methods.md#deformable-detr-architecture)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from detrkit.ops.boxes import INVERSE_SIGMOID_EPS, at_least_float32, inverse_sigmoid


def refined_reference(
    box_head: nn.Module, hidden: Tensor, reference: Tensor, eps: float = INVERSE_SIGMOID_EPS
) -> Tensor:
    """sigmoid(box_head(hidden) + inverse_sigmoid(reference)); a 2-d reference shifts (cx, cy).

    Args:
        hidden: [B, Q, D].
        reference: [B, Q, 2 | 4] sigmoid space.
        eps: clamp of the reference's logit (1e-3 in DINO).

    Returns:
        [B, Q, 4] refined boxes, cxcywh in [0, 1].
    """
    # Box arithmetic stays float32 under autocast (bf16 keeps ~3 significant digits).
    delta = at_least_float32(box_head(hidden))
    offset = inverse_sigmoid(at_least_float32(reference), eps)
    if reference.shape[-1] == 2:
        offset = nn.functional.pad(offset, (0, 2))
    return (delta + offset).sigmoid()


@dataclass(frozen=True)
class BoxRefiner:
    """Reference update between decoder layers.

    Attributes:
        mode: "none" keeps the initial references; "iterative" feeds every layer the detached
            refinement of the previous one (``--with_box_refine``); "look_forward_twice" does the
            same but returns the *undetached* refinements for prediction, so layer k's loss also
            trains layer k-1's box head (H-DETR's ``--look_forward_twice``).
        eps: clamp of the references' logit (``model.inverse_sigmoid_eps``).
    """

    mode: str = "none"
    eps: float = INVERSE_SIGMOID_EPS

    def step(self, box_head: nn.Module, hidden: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """-> (reference fed to the next layer, reference returned for prediction)."""
        if self.mode == "none":
            return reference, reference
        refined = refined_reference(box_head, hidden, reference, self.eps)
        # The next layer never back-propagates into earlier layers through its reference.
        returned = refined if self.mode == "look_forward_twice" else refined.detach()
        return refined.detach(), returned
