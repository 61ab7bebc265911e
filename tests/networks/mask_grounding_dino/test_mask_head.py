"""The CondInst dynamic mask head (``dynamic_mask_logits``) on hand-computed cases.

TAO's computation (reference §3.7): per instance, the input channels are ``[x_ref − x_loc, y_ref − y_loc,
8 mask features]`` where ``(x_loc, y_loc) = (j·8 + 4, i·8 + 4)`` are the stride-8 feature-pixel centres and the
relative coordinates stay in **unnormalised input pixels** (TAO's normalisation by the sizes of interest is
commented out).  The controller's 169 parameters are the weights of three 1×1 convs 10→8→8→1 (each an
``(out, in)`` matrix, row-major) followed by their biases 8, 8, 1; ReLU after the first two convs, none after
the last.  The stride-8 logits are upsampled ×2 with CondInst's ``aligned_bilinear``: for a row ``[a, b]`` that
gives ``[a, a, (a+b)/2, b]`` (replicate-pad one pixel, corner-aligned bilinear to 2n+1, shift by one, crop).

Every expected number below was worked out by hand from that description.
"""
from __future__ import annotations

import torch

from networks.mask_grounding_dino.model import dynamic_mask_logits

C = 8  # mask-feature channels (hidden 256 / 32)


def _params(w1, w2, w3, b1, b2, b3) -> torch.Tensor:
    """The controller layout: all weights (row-major), then all biases → [169]."""
    w1, w2, w3 = torch.as_tensor(w1), torch.as_tensor(w2), torch.as_tensor(w3)
    assert w1.shape == (8, C + 2) and w2.shape == (8, 8) and w3.shape == (1, 8)
    p = torch.cat([w1.flatten(), w2.flatten(), w3.flatten(), torch.as_tensor(b1), torch.as_tensor(b2),
                   torch.as_tensor(b3)]).float()
    assert p.numel() == 169
    return p


def test_one_instance_2x2_coordinates_features_relus_and_biases():
    # mask features [1, 8, 2, 2]: channel 0 and channel 7 carry values; the others hold 100 with zero weight, so
    # reading the wrong channel (e.g. features before the coordinates) changes the result
    feats = torch.full((1, C, 2, 2), 100.0)
    feats[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    feats[0, 7] = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    # centre (x, y) = (10, 6) px; feature-pixel centres x ∈ {4, 12}, y ∈ {4, 12}
    # rel_x = 10 − x_loc = [[6, −2], [6, −2]], rel_y = 6 − y_loc = [[2, 2], [−6, −6]]
    centres = torch.tensor([[[10.0, 6.0]]])

    w1 = torch.zeros(8, C + 2)
    w1[0, 0] = 1.0                  # h0 = relu(rel_x)          = [[6, 0], [6, 0]]
    w1[1, 1] = 1.0                  # h1 = relu(rel_y)          = [[2, 2], [0, 0]]
    w1[2, 0] = -1.0                 # h2 = relu(−rel_x)         = [[0, 2], [0, 2]]
    w1[3, 2], w1[3, 9] = 2.0, -1.0  # h3 = relu(2·f0 − f7 − 3) = relu([[−1, 1], [3, 0]]) = [[0, 1], [3, 0]]
    b1 = torch.tensor([0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    w2 = torch.zeros(8, 8)
    w2[0, 0] = w2[1, 1] = w2[2, 2] = w2[3, 3] = 1.0  # g0..g3 = h0..h3
    w2[4, 0], w2[4, 1] = 1.0, -1.0                    # g4 = relu(h0 − h1 − 5) = relu([[−1, −7], [1, −5]])
    b2 = torch.tensor([0.0, 0.0, 0.0, 0.0, -5.0, 0.0, 0.0, 0.0])  # = [[0, 0], [1, 0]]
    w3 = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0, 0.0, 0.0, 0.0]])
    b3 = torch.tensor([-30.0])
    # out = g0 + 10·g1 + 100·g2 + 1000·g3 + 10000·g4 − 30 (no ReLU after the last conv: −4 stays negative)
    stride8 = torch.tensor([[6 + 20 - 30, 20 + 200 + 1000 - 30],
                            [6 + 3000 + 10000 - 30, 200 - 30]], dtype=torch.float32)
    assert stride8.tolist() == [[-4.0, 1190.0], [12976.0, 170.0]]
    # aligned_bilinear ×2: rows [a, b] → [a, a, (a+b)/2, b]; the same rule down the columns
    top = [-4.0, -4.0, 593.0, 1190.0]
    bottom = [12976.0, 12976.0, 6573.0, 170.0]
    middle = [(t + b) / 2 for t, b in zip(top, bottom, strict=True)]
    expected = torch.tensor([top, top, middle, bottom])
    assert middle == [6486.0, 6486.0, 3583.0, 680.0]

    params = _params(w1, w2, w3, b1, b2, b3)[None, None]  # [B=1, N=1, 169]
    out = dynamic_mask_logits(feats, params, centres)
    assert out.shape == (1, 1, 1, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0, 0], expected, rtol=0, atol=1e-3)


def test_two_instances_use_their_own_parameters_and_centres():
    # a 1×3 feature map: x_loc = 4, 12, 20 and y_loc = 4; feature channel 0 = [1, 2, 3], the others 0
    feats = torch.zeros(1, C, 1, 3)
    feats[0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    centres = torch.tensor([[[12.0, 4.0], [0.0, 20.0]]])

    # instance A at (12, 4): rel_x = [8, 0, −8]; out = relu(rel_x) + 2·relu(−rel_x) = [8, 0, 16]
    w1a = torch.zeros(8, C + 2)
    w1a[0, 0], w1a[1, 0] = 1.0, -1.0
    w2a = torch.eye(8)
    w3a = torch.tensor([[1.0, 2.0, 0, 0, 0, 0, 0, 0]])
    pa = _params(w1a, w2a, w3a, torch.zeros(8), torch.zeros(8), torch.zeros(1))
    # instance B at (0, 20): rel_y = 20 − 4 = 16 everywhere; out = 3·relu(rel_y) + relu(f0) + 1 = [50, 51, 52]
    w1b = torch.zeros(8, C + 2)
    w1b[0, 1], w1b[1, 2] = 1.0, 1.0
    w2b = torch.eye(8)
    w3b = torch.tensor([[3.0, 1.0, 0, 0, 0, 0, 0, 0]])
    pb = _params(w1b, w2b, w3b, torch.zeros(8), torch.zeros(8), torch.ones(1))

    out = dynamic_mask_logits(feats, torch.stack([pa, pb])[None], centres)
    assert out.shape == (1, 2, 1, 2, 6)
    # ×2 along a row [a, b, c] → [a, a, (a+b)/2, b, (b+c)/2, c]; a single row is repeated
    row_a = [8.0, 8.0, 4.0, 0.0, 8.0, 16.0]
    row_b = [50.0, 50.0, 50.5, 51.0, 51.5, 52.0]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([row_a, row_a]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([row_b, row_b]), rtol=0, atol=1e-4)


def test_images_of_a_batch_use_their_own_mask_features():
    # same parameters and centre for both images, different features: h0 = relu(f0), out = h0 (+0 bias)
    feats = torch.zeros(2, C, 1, 2)
    feats[0, 0, 0] = torch.tensor([1.0, 3.0])
    feats[1, 0, 0] = torch.tensor([-2.0, 7.0])
    w1 = torch.zeros(8, C + 2)
    w1[0, 2] = 1.0
    p = _params(w1, torch.eye(8), torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]]), torch.zeros(8), torch.zeros(8),
                torch.zeros(1))
    out = dynamic_mask_logits(feats, p.expand(2, 1, 169), torch.zeros(2, 1, 2))
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor([1.0, 1.0, 2.0, 3.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 0, 0, 0], torch.tensor([0.0, 0.0, 3.5, 7.0]), rtol=0, atol=1e-5)
