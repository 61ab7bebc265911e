"""Swin backbone: output shapes (padding for odd sizes), official-release weight loading, window mismatch."""
from __future__ import annotations

import pytest
import torch

from networks.backbones.swin import SWIN_PRESETS, SwinTransformer, load_swin_weights
from networks.common.errors import CheckpointError
from networks.common.weights import LoadReport, apply_state_dict


def _tiny(**kw):
    args = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, drop_path_rate=0.0)
    args.update(kw)
    return SwinTransformer(**args).eval()


@pytest.mark.parametrize("hw", [(64, 96), (75, 61), (33, 130)])
def test_output_shapes_and_strides_for_any_input_size(hw):
    h, w = hw
    net = _tiny()
    with torch.no_grad():
        out = net(torch.randn(1, 3, h, w))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    eh, ew = -(-h // 4), -(-w // 4)
    for i, key in enumerate(["res2", "res3", "res4", "res5"]):
        assert out[key].shape == (1, 16 * 2 ** i, eh, ew), key
        assert torch.isfinite(out[key]).all()
        eh, ew = (eh + 1) // 2, (ew + 1) // 2
    assert net.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert net.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_out_indices_and_batch_independence():
    net = _tiny(out_indices=(1, 3))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        single = net(x[1:])
    assert list(out) == ["res3", "res5"]
    torch.testing.assert_close(out["res5"][1:], single["res5"], atol=1e-5, rtol=1e-5)
    assert not hasattr(net, "norm0")


def _official_release_dict(net: SwinTransformer) -> dict:
    """Mimic swin_tiny_patch4_window7_224*.pth: {"model": ...} with head, final norm and attn_mask buffers."""
    sd = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("norm")}
    sd["norm.weight"] = torch.ones(128)
    sd["norm.bias"] = torch.zeros(128)
    sd["head.weight"] = torch.zeros(1000, 128)
    sd["head.bias"] = torch.zeros(1000)
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": sd}


def test_official_format_loads_with_empty_non_benign_report():
    src = _tiny()
    dst = _tiny()
    release = _official_release_dict(src)
    report = load_swin_weights(dst, release)
    assert isinstance(report, LoadReport)
    assert report.unexpected == [] and report.mismatched == []
    # the per-stage output norms are not in classification releases: they stay at init
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert set(report.benign) == {"norm.weight", "norm.bias", "head.weight", "head.bias", "layers.0.blocks.1.attn_mask"}
    for k, v in release["model"].items():
        if k in dst.state_dict():
            assert torch.equal(dst.state_dict()[k], v), k


def test_full_backbone_dict_with_prefix_is_clean():
    src = _tiny()
    dst = _tiny()
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    report = load_swin_weights(dst, {"state_dict": sd})
    assert report.clean
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(src(x)["res5"], dst(x)["res5"])


def test_window_size_mismatch_interpolates_or_raises():
    src = _tiny(window_size=7)
    dst = _tiny(window_size=12)
    report = load_swin_weights(dst, {"model": src.state_dict()})
    assert report.mismatched == [] and report.unexpected == []
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 1)
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        load_swin_weights(_tiny(window_size=12), {"model": src.state_dict()}, interpolate_window=False)


def test_apply_state_dict_shape_mismatch_names_key_and_shapes():
    net = _tiny()
    sd = net.state_dict()
    sd["patch_embed.proj.weight"] = torch.zeros(8, 3, 4, 4)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*\(8, 3, 4, 4\).*\(16, 3, 4, 4\)"):
        apply_state_dict(net, sd)


def test_presets_and_checkpointing_gradients():
    assert SWIN_PRESETS["tiny"] == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert SWIN_PRESETS["large"][0] == 192
    torch.manual_seed(0)
    a = _tiny(depths=[2, 1, 1, 1])
    b = _tiny(depths=[2, 1, 1, 1], use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    a.train()
    b.train()
    x = torch.randn(1, 3, 32, 32)
    a(x)["res5"].sum().backward()
    b(x)["res5"].sum().backward()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=na)
