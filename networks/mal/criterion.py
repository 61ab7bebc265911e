"""MAL's box-supervised losses: MIL box-projection dice and the mean-field ("CRF") pseudo-label dice.

All inputs are probabilities in [0,1] at mask-logit resolution (``[B,H,W]``, H = W = 4h), computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dice_loss_squared", "mil_loss", "MeanField", "mal_losses"]


def dice_loss_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - 2Σab / ((Σa² + 0.001) + (Σb² + 0.001))`` over all but the first dim -> ``[B]`` fp32."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    inter = (a * b).sum(1)
    return 1.0 - 2.0 * inter / ((a * a).sum(1) + 0.001 + (b * b).sum(1) + 0.001)


def mil_loss(probs: torch.Tensor, box_target: torch.Tensor) -> torch.Tensor:
    """Box-projection loss ``[B,H,W] x [B,H,W] -> [B]``: dice of the max over W plus dice of the max over H."""
    return (dice_loss_squared(probs.amax(2), box_target.amax(2))
            + dice_loss_squared(probs.amax(1), box_target.amax(1)))


class MeanField(nn.Module):
    """Product-form mean field over a k x k colour affinity; returns the refined HARD mask (§3.3 of mal.md).

    ``forward(image [B,C,H,W] (normalised), init [B,H,W] probs, box [B,H,W] in [0,1]) -> [B,H,W] float {0,1}``.
    Affinity ``K(p,q) = exp(-|F(q)-F(p)|² / 2ζ²)`` on ``F = image + 10`` with zero padding (so out-of-image
    neighbours have ~0 affinity), q ranging over the window including p.  Starting from
    ``s = clamp(init·box, lo, hi)`` each iteration sets ``A_l(p) = Π_q x_l(q)^K(p,q)`` for x = [1-s, s], gates the
    foreground by the box and renormalises with clamping.  Output ``s > 0.5``.  Runs in fp32 without grad.
    """

    def __init__(self, kernel_size: int = 3, zeta: float = 0.1, num_iter: int = 100,
                 low: float = 0.1, high: float = 0.9):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.zeta = float(zeta)
        self.num_iter = int(num_iter)
        self.low = float(low)
        self.high = float(high)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        # [B,C,H,W] -> [B,C,k²,H*W], zero padded
        b, c = x.shape[:2]
        k = self.kernel_size
        return F.unfold(x, k, padding=k // 2).reshape(b, c, k * k, -1)

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """``[B,C,H,W] -> [B,k²,H*W]`` colour affinity of each pixel to its window."""
        b, c, h, w = image.shape
        feat = image.float() + 10.0
        diff = self._unfold(feat) - feat.reshape(b, c, 1, h * w)
        return torch.exp(-(diff * diff).sum(1) / (2.0 * self.zeta ** 2))

    @torch.no_grad()
    def refine(self, image: torch.Tensor, init: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """The continuous state ``s`` ``[B,H,W]`` after ``num_iter`` iterations (for tests / inspection)."""
        with torch.autocast(device_type=image.device.type, enabled=False):
            b, h, w = init.shape
            k, r = self.kernel_size, self.kernel_size // 2
            kernel = self.affinity(image).reshape(b, 1, k * k, h, w)
            box = box.float().reshape(b, h, w)
            s = (init.float() * box).clamp(self.low, self.high)
            for _ in range(self.num_iter):
                # Σ_q K(p,q)·(-log x(q)) as k² shifted multiply-adds: same result as unfold (im2col), without
                # materialising the k²-times larger tensor 100 times per step.  Zero padding of -log x means an
                # out-of-image neighbour contributes a factor 1, as in TAO.
                nlog = F.pad(-torch.log(torch.stack([1.0 - s, s], 1)), (r, r, r, r))  # [B,2,H+2r,W+2r]
                acc = torch.zeros((b, 2, h, w), dtype=s.dtype, device=s.device)
                j = 0
                for dy in range(k):
                    for dx in range(k):
                        acc.addcmul_(nlog[:, :, dy:dy + h, dx:dx + w], kernel[:, :, j])
                        j += 1
                agg = torch.exp(-acc)
                fg = agg[:, 1] * box
                s = (fg / (agg[:, 0] + fg + 1e-6)).clamp(self.low, self.high)
            return s

    @torch.no_grad()
    def forward(self, image: torch.Tensor, init: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        return (self.refine(image, init, box) > 0.5).float()


def mal_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, image: torch.Tensor,
               box_mask: torch.Tensor, mean_field: MeanField, *, epoch: int, step_in_epoch: int,
               loss_mil_weight: float = 4.0, loss_crf_weight: float = 0.5, loss_mil_step: int = 1000,
               loss_crf_step: int = 4000, crf_size_ratio: int = 1) -> dict[str, torch.Tensor]:
    """MAL's two training losses as scalars ``{"loss_mil", "loss_crf"}`` (fp32, warm-ups and weights applied).

    ``student_logits``/``teacher_logits`` ``[B,1,H,W]``; ``image`` ``[B,3,S,S]`` the normalised student crop;
    ``box_mask`` ``[B,1,S,S]`` crop-space box mask.  ``step_in_epoch`` is the 0-based optimizer-step index within
    the epoch; in epoch 0 the weights ramp as ``min(1, step / loss_*_step)`` (TAO), afterwards they are 1.
    The mean field runs at ``crf_size_ratio`` x the logit resolution, on ``(P_s + P_t)/2``, gated by the box.
    """
    b, _, oh, ow = student_logits.shape
    ps = torch.sigmoid(student_logits.float())[:, 0]
    pt = torch.sigmoid(teacher_logits.float())[:, 0].detach()
    target = F.interpolate(box_mask.float(), size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]

    def ramp(total: int) -> float:
        if epoch > 0:
            return 1.0
        return min(1.0, step_in_epoch / total) if total > 0 else 1.0

    mil = mil_loss(ps, target)
    loss_mil = mil.sum() / (b + 1e-4) * (loss_mil_weight * ramp(loss_mil_step))

    th, tw = oh * int(crf_size_ratio), ow * int(crf_size_ratio)
    img = F.interpolate(image.float(), size=(th, tw), mode="bilinear", align_corners=False)
    if (th, tw) != (oh, ow):
        ps_c = F.interpolate(ps[:, None], size=(th, tw), mode="bilinear", align_corners=False)[:, 0]
        pt_c = F.interpolate(pt[:, None], size=(th, tw), mode="bilinear", align_corners=False)[:, 0]
    else:
        ps_c, pt_c = ps, pt
    box_c = F.interpolate(box_mask.float(), size=(th, tw), mode="bilinear", align_corners=False)[:, 0]
    pseudo = mean_field(img, (ps_c.detach() + pt_c) / 2, box_c)
    loss_crf = dice_loss_squared(ps_c, pseudo).mean() * (loss_crf_weight * ramp(loss_crf_step))
    return {"loss_mil": loss_mil, "loss_crf": loss_crf}
