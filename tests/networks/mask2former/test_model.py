"""Mask2Former model: build from spec, forward/backward, prediction count, names, config errors, pretrained load."""
from __future__ import annotations

import copy

import pytest
import torch

from networks.common.errors import CheckpointError, ConfigError
from networks.mask2former.model import (
    SWIN_TYPES,
    Mask2FormerModel,
    MultiScaleMaskedTransformerDecoder,
    build_model,
    load_backbone_weights,
)

TINY = {
    "backbone": {"type": "swin", "pretrained_weights": None,
                 "swin": {"type": "custom", "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
                          "window_size": 7, "drop_path_rate": 0.1,
                          "out_features": ["res2", "res3", "res4", "res5"]}},
    "sem_seg_head": {"num_classes": 3, "convs_dim": 32, "mask_dim": 16, "transformer_enc_layers": 1,
                     "common_stride": 4, "norm": "GN",
                     "deformable_transformer_encoder_in_features": ["res3", "res4", "res5"]},
    "mask_former": {"hidden_dim": 32, "num_object_queries": 6, "dec_layers": 4, "nheads": 4, "dim_feedforward": 64,
                    "dropout": 0.0, "pre_norm": False},
}


def _cfg(**changes):
    cfg = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


def test_forward_backward_finite_and_shapes():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    x = torch.randn(2, 3, 96, 128)
    out = model(x)
    assert out["pred_logits"].shape == (2, 6, 4)
    assert out["pred_masks"].shape == (2, 6, 24, 32)
    assert len(out["aux_outputs"]) == 3  # dec_layers - 1 layers -> dec_layers predictions
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
    loss = loss + sum(a["pred_masks"].mean() + a["pred_logits"].mean() for a in out["aux_outputs"])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["backbone.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.value_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("dec_layers", [1, 2, 7])
def test_prediction_count_follows_dec_layers(dec_layers):
    model = build_model(_cfg(mask_former__dec_layers=dec_layers)).eval()
    assert len(model.sem_seg_head.predictor.transformer_cross_attention_layers) == dec_layers - 1
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert len(out["aux_outputs"]) == dec_layers - 1


def test_state_dict_uses_original_detectron2_names():
    keys = set(build_model(TINY).state_dict())
    expected = [
        "backbone.patch_embed.proj.weight",
        "backbone.layers.0.blocks.0.attn.qkv.weight",
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
        "backbone.layers.2.downsample.reduction.weight",
        "backbone.norm3.weight",
        "sem_seg_head.pixel_decoder.input_proj.0.0.weight",
        "sem_seg_head.pixel_decoder.input_proj.2.1.bias",
        "sem_seg_head.pixel_decoder.transformer.level_embed",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.weight",
        "sem_seg_head.pixel_decoder.adapter_1.weight",
        "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
        "sem_seg_head.pixel_decoder.layer_1.norm.bias",
        "sem_seg_head.pixel_decoder.mask_features.weight",
        "sem_seg_head.predictor.query_feat.weight",
        "sem_seg_head.predictor.query_embed.weight",
        "sem_seg_head.predictor.level_embed.weight",
        "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight",
        "sem_seg_head.predictor.transformer_cross_attention_layers.2.multihead_attn.out_proj.weight",
        "sem_seg_head.predictor.transformer_ffn_layers.1.linear2.bias",
        "sem_seg_head.predictor.decoder_norm.weight",
        "sem_seg_head.predictor.class_embed.weight",
        "sem_seg_head.predictor.mask_embed.layers.2.weight",
    ]
    missing = [k for k in expected if k not in keys]
    assert not missing, missing
    # no bias on the GN-normalised FPN convs (detectron2: bias only when norm == "")
    assert "sem_seg_head.pixel_decoder.adapter_1.bias" not in keys


def _masked_decoder(num_layers: int = 3):
    """A decoder whose predicted masks do not depend on the query: ``mask_embed`` outputs the constant 1-vector,
    so every query's mask logit at a pixel is the channel sum of ``mask_features`` there."""
    torch.manual_seed(0)
    dec = MultiScaleMaskedTransformerDecoder(in_channels=32, num_classes=2, hidden_dim=32, num_queries=3, nheads=4,
                                             dim_feedforward=32, num_layers=num_layers, mask_dim=8).eval()
    with torch.no_grad():
        dec.mask_embed.layers[2].weight.zero_()
        dec.mask_embed.layers[2].bias.fill_(1.0)
    return dec


def _levels():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 32, s, s, generator=g) for s in (2, 4, 8)]


def test_attention_mask_blocks_outside_predicted_masks():
    """Cross-attention sees only the pixels inside the query's predicted mask (sigmoid ≥ 0.5) at every level."""
    dec = _masked_decoder()
    mask_features = torch.full((1, 8, 16, 16), 100.0)
    mask_features[..., 8:] = -100.0  # every query's mask: the left half of the image
    feats = _levels()
    with torch.no_grad():
        ref = dec(feats, mask_features)["pred_logits"]
        # changing every level's features in the right (blocked) half leaves the queries unchanged
        outside = [f.clone() for f in feats]
        for f in outside:
            f[..., f.shape[-1] // 2:] += 5.0
        blocked = dec(outside, mask_features)["pred_logits"]
        # the same change in the left (allowed) half of the first level reaches the queries
        inside = [f.clone() for f in feats]
        inside[0][..., : inside[0].shape[-1] // 2] += 5.0
        allowed = dec(inside, mask_features)["pred_logits"]
    torch.testing.assert_close(blocked, ref, atol=1e-6, rtol=0)
    assert (allowed - ref).abs().max() > 1e-3


def test_query_whose_mask_is_empty_attends_everywhere():
    """A query whose predicted mask blocks every pixel is unblocked (TAO): finite outputs, and it sees all pixels."""
    dec = _masked_decoder(num_layers=1)
    mask_features = torch.full((1, 8, 16, 16), -100.0)  # every mask logit hugely negative: all blocked
    feats = _levels()
    with torch.no_grad():
        ref = dec(feats, mask_features)["pred_logits"]
        changed = []
        for y, x in ((0, 0), (0, 1), (1, 0), (1, 1)):  # level 0 (2×2) is the only level a 1-layer decoder reads
            other = [f.clone() for f in feats]
            other[0][..., y, x] += 5.0
            changed.append((dec(other, mask_features)["pred_logits"] - ref).abs().max().item())
    assert torch.isfinite(ref).all()
    assert min(changed) > 1e-4, changed


def test_activation_checkpoint_gives_same_gradients():
    torch.manual_seed(0)
    a = build_model(TINY).train()
    b = build_model(TINY, activation_checkpoint=True).train()
    b.load_state_dict(a.state_dict())
    for m in (a, b):  # drop path is random; switch it off to compare
        for mod in m.modules():
            if hasattr(mod, "drop_prob"):
                mod.drop_prob = 0.0
    x = torch.randn(1, 3, 64, 64)
    for m in (a, b):
        out = m(x)
        (out["pred_masks"].mean() + out["pred_logits"].mean()).backward()
    ga = dict(a.named_parameters())
    for n, p in b.named_parameters():
        torch.testing.assert_close(p.grad, ga[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_presets_and_custom_type():
    assert set(SWIN_TYPES) == {"tiny", "small", "base", "large", "custom"}
    model = build_model(_cfg(backbone__swin__type="tiny"))
    assert model.backbone.num_features == [96, 192, 384, 768]
    assert len(model.backbone.layers[2].blocks) == 6


@pytest.mark.parametrize("changes, key", [
    ({"backbone__swin__type": "huge"}, "model.backbone.swin.type"),
    ({"backbone__type": "resnet"}, "model.backbone.type"),
    ({"sem_seg_head__convs_dim": 48}, "model.sem_seg_head.convs_dim"),
    ({"mask_former__nheads": 5}, "model.mask_former.nheads"),
    ({"backbone__swin__out_features": ["res2", "res3", "res4"]},
     "model.sem_seg_head.deformable_transformer_encoder_in_features"),
    ({"backbone__swin__num_heads": [3, 2, 2, 4]}, "model.backbone.swin.num_heads"),
])
def test_bad_config_raises_config_error_naming_the_field(changes, key):
    with pytest.raises(ConfigError) as exc:
        build_model(_cfg(**changes))
    assert exc.value.subject == key


def test_load_backbone_weights_from_release_file(tmp_path):
    src = build_model(TINY)
    backbone_sd = {k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    # classification releases have no per-stage output norms
    release = {"model": {k: v for k, v in backbone_sd.items() if not k.startswith("norm")}}
    release["model"]["head.weight"] = torch.zeros(10, 128)
    path = tmp_path / "swin.pth"
    torch.save(release, path)
    dst = build_model(TINY)
    report = load_backbone_weights(dst, path)
    assert report.unexpected == [] and report.mismatched == []
    assert "head.weight" in report.benign
    assert torch.equal(dst.backbone.patch_embed.proj.weight, src.backbone.patch_embed.proj.weight)
    with pytest.raises(CheckpointError):
        load_backbone_weights(dst, tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_backbone_weights(dst, bad)


def test_model_type_and_properties():
    model = build_model(TINY)
    assert isinstance(model, Mask2FormerModel)
    assert model.num_classes == 3 and model.num_queries == 6
    assert model.sem_seg_head.predictor.class_embed.out_features == 4


def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(TINY).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            out = self.m(x)
            return out["pred_logits"], out["pred_masks"]

    wrap = Wrap().eval()
    path = tmp_path / "m2f.onnx"
    torch.onnx.export(wrap, (torch.randn(1, 3, 64, 96),), str(path), input_names=["inputs"],
                      output_names=["pred_logits", "pred_masks"], opset_version=17, dynamo=False,
                      dynamic_axes={"inputs": {0: "b"}, "pred_logits": {0: "b"}, "pred_masks": {0: "b"}})
    wrap.eval()  # export restores the wrapper's mode recursively
    x = torch.randn(2, 3, 64, 96)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"inputs": x.numpy()})
    with torch.no_grad():
        want = wrap(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-4, rtol=1e-4)
