"""Swin release formats: a random timm Swin, saved in timm's layout and renamed to Microsoft's release layout,
gives the same features in our backbone (≤ 1e-4); another window size resizes the bias tables and says so."""
from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F

from networks.backbones.swin import SwinTransformer, load_swin_weights
from networks.backbones.swin_weights import (
    convert_swin_state_dict,
    swin_formats,
    swin_layout,
    unused_swin_keys,
)
from networks.common.errors import CheckpointError
from networks.common.weight_formats import detect_format, load_converted, read_source
from tests.inspect_check import assert_inspect_names

timm = pytest.importorskip("timm")

ARCH = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
IMG = 256  # stage 4 is 8x8 > window 4: timm shifts every stage, as our (padding) backbone does


def _timm_swin(window: int = 4):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=IMG, window_size=window,
                              drop_path_rate=0.0, num_classes=10, **ARCH).eval()
    with torch.no_grad():  # LayerNorms start at identity: perturb every tensor so each mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ours(window: int = 4) -> SwinTransformer:
    return SwinTransformer(window_size=window, drop_path_rate=0.0, **ARCH).eval()


def _microsoft_names(timm_sd: dict) -> dict:
    """timm → Microsoft release names, written out from the two repositories (not from our converter):
    timm's ``layers.{s}.downsample`` opens stage s, Microsoft's closes stage s-1; ``head.fc`` → ``head``; Microsoft
    files also carry the ``relative_position_index`` buffers."""
    out = {}
    for k, v in timm_sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("relative_position_bias_table"):
            ws = (int(v.shape[0] ** 0.5) + 1) // 2
            c = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
            rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + ws - 1
            out[k.replace("relative_position_bias_table", "relative_position_index")] = \
                rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    return out


def _assert_same_features(ref, ours: SwinTransformer) -> float:
    torch.manual_seed(1)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        stages = ref.forward_intermediates(x, norm=False, output_fmt="NCHW", intermediates_only=True)
        out = ours(x)
    worst = 0.0
    assert len(stages) == 4
    for i, stage in enumerate(stages):
        # our per-stage norm{i} is new (weight 1, bias 0): the reference is timm's stage output, layer-normed
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), (stage.shape[1],)).permute(0, 3, 1, 2)
        got = out[f"res{i + 2}"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"res{i + 2}")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def _load(path, window: int = 4):
    src = read_source(path)
    fmt = detect_format(src, swin_formats("mask2former"))
    ours = _ours(window)
    report = load_converted(ours, src, fmt, {"backbone": {"swin": {"window_size": window}}})
    return fmt, ours, report


@pytest.mark.parametrize("layout", ["timm", "microsoft"])
def test_release_layouts_give_timm_features(tmp_path, layout):
    ref = _timm_swin()
    sd = ref.state_dict()
    assert not any(k.endswith("relative_position_index") for k in sd)  # timm keeps it out of the state dict
    path = tmp_path / f"{layout}.pth"
    torch.save(sd if layout == "timm" else {"model": _microsoft_names(sd)}, path)
    fmt, ours, report = _load(path)
    # Swin releases serve both Swin networks; inspect names the first that lists them
    assert_inspect_names(path, "mask2former", f"swin-{layout}")
    assert fmt.name == f"swin-{layout}"
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.unexpected == [] and report.mismatched == [] and report.benign == []
    head = "head.fc" if layout == "timm" else "head"
    assert set(unused_swin_keys(read_source(path).tensors)) == {f"{head}.weight", f"{head}.bias", "norm.weight",
                                                                "norm.bias"}
    assert report.loaded == len(ours.state_dict()) - 8
    _assert_same_features(ref, ours)


def test_load_swin_weights_accepts_timm_names():
    """The loader Mask Grounding DINO uses takes timm state dicts too."""
    ref = _timm_swin()
    ours = _ours()
    report = load_swin_weights(ours, ref.state_dict())
    assert report.unexpected == [] and report.mismatched == []
    _assert_same_features(ref, ours)


def test_other_window_is_interpolated_and_reported(tmp_path, caplog):
    ref = _timm_swin(window=4)
    path = tmp_path / "swin_w4.pth"
    torch.save({"model": _microsoft_names(ref.state_dict())}, path)
    with caplog.at_level(logging.INFO, logger="networks.backbones.swin_weights"):
        _, ours, report = _load(path, window=6)
    assert report.mismatched == [] and report.unexpected == []
    assert "resized the relative-position bias tables of 8 blocks from window 4 to 6" in caplog.text
    table = ours.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (11 * 11, 1)
    # the resized table is the bicubic resample of the file's one (centre value kept up to interpolation error)
    src_table = ref.layers[0].blocks[0].attn.relative_position_bias_table.detach()
    assert abs(table[60, 0].item() - src_table[24, 0].item()) < 1e-3
    assert torch.equal(ours.layers[0].blocks[0].attn.relative_position_index,
                       _ours(6).layers[0].blocks[0].attn.relative_position_index)
    with pytest.raises(CheckpointError, match="window 4, the model uses window 6"):
        convert_swin_state_dict(ref.state_dict(), target_window=6, interpolate=False)
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        load_swin_weights(_ours(6), ref.state_dict(), interpolate_window=False)


def test_layout_detection_and_refusal(tmp_path):
    sd = _timm_swin().state_dict()
    assert swin_layout(sd) == "timm"
    assert swin_layout(_microsoft_names(sd)) == "microsoft"
    assert swin_layout({"layers_0." + k[len("layers.0."):]: v for k, v in sd.items() if k.startswith("layers.0.")}) \
        == "timm"
    assert swin_layout({"backbone.0.body.x": torch.zeros(1)}) is None
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="weights in any known layout"):
        detect_format(read_source(path), swin_formats("mask2former"))


def test_prefixed_formats_for_a_network():
    """``swin_formats(..., prefix=)`` is how a network wraps the backbone keys (Mask2Former: ``backbone.``)."""
    ref = _timm_swin()
    fmt = next(f for f in swin_formats("mask2former", prefix="backbone.") if f.name == "swin-timm")
    from types import SimpleNamespace

    state = fmt.to_state_dict(SimpleNamespace(tensors=ref.state_dict(), path="x"), None)
    assert fmt.new_parts == ("backbone.norm[0-9].*",)
    assert sorted(state) == sorted("backbone." + k for k in _ours().state_dict() if not k.startswith("norm"))
