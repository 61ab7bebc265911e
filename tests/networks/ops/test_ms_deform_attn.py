"""Multi-scale deformable attention: core vs a naive per-point bilinear reference, module conventions, export."""
from __future__ import annotations

import math

import pytest
import torch

from networks.ops.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
)
from networks.ops.position_encoding import PositionEmbeddingSine

SHAPES = [(5, 7), (3, 4), (2, 2)]


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [d, H, W]; (x, y) normalised in [0,1] with pixel centres at (i+0.5)/size; zeros outside."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * img[:, yy, xx]
    return out


def _naive(value, shapes, loc, attw):
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, heads, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl] + h * w, m].t().reshape(d, h, w)
                    for p in range(points):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        out[b, q, m] += attw[b, q, m, lvl, p] * _bilinear_zero_pad(img, x, y)
    return out.reshape(n, lq, heads * d)


def _random_inputs(seed=0, n=2, lq=3, heads=2, d=4, points=3):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(n, s, heads, d, generator=g, dtype=torch.float64)
    # include locations outside [0, 1] to exercise the zero padding
    loc = torch.rand(n, lq, heads, len(SHAPES), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    attw = torch.rand(n, lq, heads, len(SHAPES), points, generator=g, dtype=torch.float64)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    return value, loc, attw


IMPLEMENTATIONS = {"grid_sample": ms_deform_attn_grid_sample, "gather": ms_deform_attn_gather}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_core_matches_naive_bilinear_reference(impl):
    core = IMPLEMENTATIONS[impl]
    value, loc, attw = _random_inputs()
    got = core(value, torch.tensor(SHAPES), loc, attw)
    want = _naive(value, SHAPES, loc, attw)
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # shapes may also be a python list
    torch.testing.assert_close(core(value, SHAPES, loc, attw), want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_core_gradients_flow_to_value_locations_and_weights(impl):
    core = IMPLEMENTATIONS[impl]
    value, loc, attw = _random_inputs(seed=1)
    assert torch.autograd.gradcheck(lambda v, loc_, a: core(v, SHAPES, loc_, a),
                                    (value[:, :, :, :2].detach().clone().requires_grad_(True),
                                     loc.detach().clone().requires_grad_(True),
                                     attw.detach().clone().requires_grad_(True)), eps=1e-6, atol=1e-5)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, loc_, a: core(v, SHAPES, loc_, a),
                                    (value[:1, :, :1, :2].detach().clone().requires_grad_(True),
                                     loc[:1, :1, :1].detach().clone().clamp(0.05, 0.95).requires_grad_(True),
                                     attw[:1, :1, :1].detach().clone().requires_grad_(True)), eps=1e-6, atol=1e-5)


def test_gather_equals_grid_sample_forward_and_backward_in_float32():
    """The CPU path (row gathers) against grid_sample on a Mask2Former-like case: several levels, batch and
    heads, points spread beyond the map (partly and far outside, and on its edges).  (Exact pixel centres are
    left out: there the bilinear map has a kink, and each implementation picks one side's derivative.)"""
    shapes = [(12, 10), (6, 5), (3, 3)]
    g = torch.Generator().manual_seed(3)
    n, lq, heads, d, points = 2, 50, 4, 8, 4
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d, generator=g)
    loc = torch.rand(n, lq, heads, len(shapes), points, 2, generator=g) * 1.6 - 0.3
    loc[0, :3, 0, 0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1e6, -1e6]])
    attw = torch.rand(n, lq, heads, len(shapes), points, generator=g).softmax(-1)
    grads = []
    outs = []
    for core in (ms_deform_attn_gather, ms_deform_attn_grid_sample):
        args = [t.clone().requires_grad_(True) for t in (value, loc, attw)]
        out = core(args[0], shapes, args[1], args[2])
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append(out.detach())
        grads.append([a.grad for a in args])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for got, want, name in zip(grads[0], grads[1], ("value", "locations", "weights"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_core_takes_the_gather_path_on_cpu_with_wide_heads_else_grid_sample(monkeypatch):
    import networks.ops.ms_deform_attn as msda

    used = []
    monkeypatch.setattr(msda, "ms_deform_attn_gather", lambda *a: used.append("gather") or ms_deform_attn_gather(*a))
    monkeypatch.setattr(msda, "ms_deform_attn_grid_sample",
                        lambda *a: used.append("grid_sample") or ms_deform_attn_grid_sample(*a))
    wide = [t.float() for t in _random_inputs(d=msda.GATHER_MIN_HEAD_DIM)]
    narrow = [t.float() for t in _random_inputs(d=msda.GATHER_MIN_HEAD_DIM // 2)]
    ms_deform_attn_core(wide[0], SHAPES, wide[1], wide[2])
    ms_deform_attn_core(narrow[0], SHAPES, narrow[1], narrow[2])
    torch.jit.trace(lambda v, p, a: ms_deform_attn_core(v, SHAPES, p, a), tuple(wide), check_trace=False)
    assert used == ["gather", "grid_sample", "grid_sample"]


def _module_and_inputs(ref_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    mod = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 4, 16, dtype=torch.float64)
    src = torch.randn(2, s, 16, dtype=torch.float64)
    ref = torch.rand(2, 4, 3, ref_dim, dtype=torch.float64)
    return mod, query, src, ref


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_sampling_locations_follow_the_reference_convention(ref_dim):
    mod, query, src, ref = _module_and_inputs(ref_dim)
    out = mod(query, ref, src, torch.tensor(SHAPES), None, None)
    # recompute by hand with the documented convention
    n, lq, _ = query.shape
    heads, levels, points = 2, 3, 3
    value = mod.value_proj(src).view(n, -1, heads, 8)
    off = mod.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
    w = mod.attention_weights(query).view(n, lq, heads, levels * points).softmax(-1).view(n, lq, heads, levels, points)
    if ref_dim == 2:
        norm = torch.tensor([[wd, ht] for ht, wd in SHAPES], dtype=torch.float64)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / points * ref[:, :, None, :, None, 2:] * 0.5
    want = mod.output_proj(_naive(value, SHAPES, loc, w))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_padding_mask_zeroes_values():
    mod, query, src, ref = _module_and_inputs(2)
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    mask[:, -4:] = True  # last level entirely padding
    out_masked = mod(query, ref, src, SHAPES, None, mask)
    src2 = src.clone()
    src2[:, -4:] = 123.0  # whatever sits under the mask must not matter
    torch.testing.assert_close(mod(query, ref, src2, SHAPES, None, mask), out_masked)


def test_init_matches_deformable_detr():
    mod = MSDeformAttn(d_model=32, n_levels=4, n_heads=8, n_points=4)
    assert torch.all(mod.sampling_offsets.weight == 0)
    bias = mod.sampling_offsets.bias.view(8, 4, 4, 2)
    # head 0 points along +x, head 2 along +y; point p at distance p+1; same for every level
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[2, 3, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert bias[2, 0, 0, 0].abs() < 1e-6
    assert torch.all(mod.attention_weights.weight == 0) and torch.all(mod.attention_weights.bias == 0)
    assert torch.all(mod.value_proj.bias == 0) and torch.all(mod.output_proj.bias == 0)


def test_onnx_export_with_dynamic_batch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    mod, query, src, ref = _module_and_inputs(2)
    mod = mod.float().eval()
    shapes = SHAPES

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mod

        def forward(self, q, r, s):
            return self.m(q, r, s, shapes)

    path = tmp_path / "msda.onnx"
    args = (query.float(), ref.float(), src.float())
    torch.onnx.export(Wrap(), args, str(path), input_names=["q", "r", "s"], output_names=["out"],
                      dynamic_axes={"q": {0: "b"}, "r": {0: "b"}, "s": {0: "b"}, "out": {0: "b"}}, opset_version=17,
                      dynamo=False)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q3, r3, s3 = (torch.cat([a, a[:1]]) for a in args)  # batch 3, not the traced 2
    got = sess.run(None, {"q": q3.numpy(), "r": r3.numpy(), "s": s3.numpy()})[0]
    with torch.no_grad():
        want = Wrap()(q3, r3, s3)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)


def test_position_embedding_sine_values_and_mask():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000, normalize=True)
    x = torch.zeros(1, 3, 2, 3)
    pos = pe(x)
    assert pos.shape == (1, 8, 2, 3) and pos.dtype == torch.float32
    # y position of row 1 (normalised to 2/2·2π); channel 0 = sin(y/1), channel 1 = cos(y/1)
    y = 2 / (2 + 1e-6) * 2 * math.pi
    assert abs(pos[0, 0, 1, 0].item() - math.sin(y)) < 1e-5
    assert abs(pos[0, 1, 1, 0].item() - math.cos(y)) < 1e-5
    # x half, column 0: x = 1/3·2π; channel 4+2 = sin(x / 10000^(2/4))
    xv = 1 / (3 + 1e-6) * 2 * math.pi
    assert abs(pos[0, 6, 0, 0].item() - math.sin(xv / 100.0)) < 1e-5
    # an all-False mask gives the same result as no mask
    torch.testing.assert_close(pe(x, torch.zeros(1, 2, 3, dtype=torch.bool)), pos)
    # separate temperatures (Grounding DINO uses 20/20)
    pe_hw = PositionEmbeddingSine(4, normalize=True, temperature_h=20, temperature_w=20)
    assert abs(pe_hw(x)[0, 6, 0, 0].item() - math.sin(xv / math.sqrt(20))) < 1e-5
