"""Mask losses on logits: dice, sigmoid cross-entropy and sigmoid focal, per pair and pairwise.

All functions take **logits** (not probabilities) and flattened masks: ``inputs`` [N, P] and ``targets`` [N, P]
(or [M, P] for the pairwise variants) where P is a number of pixels or sampled points and targets are in [0, 1].

* The per-pair losses (``dice_loss``, ``sigmoid_ce_loss``, ``sigmoid_focal_loss``) score row i of ``inputs``
  against row i of ``targets``, average over P (dice: over the mask), sum over N and divide by ``num_masks``
  (the batch-wide number of target masks, so the loss does not depend on how masks are split over images/ranks).
* The pairwise ("batch") variants return the full cost matrix [N, M] used by Hungarian matching.

Formulas follow Mask2Former (Cheng et al., 2022) and the focal loss of Lin et al. (2017); the +1 smoothing of
dice matches both the original and TAO.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

__all__ = [
    "dice_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "pairwise_dice_loss",
    "pairwise_sigmoid_ce_loss",
    "pairwise_sigmoid_focal_loss",
]


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``1 - (2·Σ p·t + 1) / (Σ p + Σ t + 1)`` with ``p = sigmoid(inputs)``, divided by ``num_masks``.

    ``inputs`` logits [N, P]; ``targets`` [N, P] in [0, 1].  Returns a scalar.
    """
    p = inputs.sigmoid().flatten(1)
    t = targets.flatten(1)
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over P, summed over N, divided by ``num_masks``.

    ``inputs`` logits [N, P]; ``targets`` [N, P] in [0, 1].  Returns a scalar.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss ``α_t (1 - p_t)^γ · BCE``, averaged over P, summed over N, divided by ``num_masks``.

    ``alpha < 0`` disables the class-balancing factor.  ``inputs`` logits [N, P]; ``targets`` [N, P] in [0, 1].
    The element-wise loss is ``torchvision.ops.sigmoid_focal_loss``; only the reduction (mean over points,
    normalised by the batch-wide mask count) is ours, as torchvision offers none/mean/sum only.
    """
    loss = tv_sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_masks


def pairwise_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction against every target: logits [N, P] × targets [M, P] → [N, M]."""
    p = inputs.sigmoid().flatten(1)
    t = targets.flatten(1).to(p.dtype)
    numerator = 2 * p @ t.T
    denominator = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of every prediction against every target: [N, P] × [M, P] → [N, M].

    ``BCE(x, t) = t·softplus(-x) + (1 - t)·softplus(x) = softplus(x) - t·x``, so summed over points the cost
    is one row sum and one matrix product (no ones/zeros tensors; this runs for every prediction set).
    """
    num_points = inputs.shape[1]
    t = targets.to(inputs.dtype)
    return (F.softplus(inputs).sum(-1)[:, None] - inputs @ t.T) / num_points


def pairwise_sigmoid_focal_loss(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean sigmoid focal loss of every prediction against every target: [N, P] × [M, P] → [N, M].

    This is TAO's matcher mask cost (``batch_sigmoid_focal_loss``); ``alpha < 0`` disables α-balancing.
    """
    num_points = inputs.shape[1]
    t = targets.to(inputs.dtype)
    p = inputs.sigmoid()
    focal_pos = ((1 - p) ** gamma) * F.binary_cross_entropy_with_logits(
        inputs, torch.ones_like(inputs), reduction="none")
    focal_neg = (p ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    return (focal_pos @ t.T + focal_neg @ (1 - t).T) / num_points


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor | None:
    """``Σ weights[k] · losses[k]`` over the terms that have a non-zero weight (None when none has).

    The one place a network turns its loss dict into the scalar it optimises; terms without a weight are
    logged but not optimised.
    """
    total = None
    for key, value in losses.items():
        w = weights.get(key, 0.0)
        if w:
            total = value * w if total is None else total + value * w
    return total
