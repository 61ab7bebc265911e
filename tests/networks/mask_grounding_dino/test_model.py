"""MaskGDinoModel: shapes, training-mode matched masks, gradients, mask-head math, config and weight loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.common.errors import ConfigError
from networks.mask_grounding_dino.model import (
    SWIN_BACKBONES,
    ContrastiveEmbed,
    MaskGDinoModel,
    aligned_bilinear,
    build_model,
    dynamic_mask_logits,
    load_pretrained,
    sine_embed,
)
from networks.mask_grounding_dino.text_encoder import BertTextEncoder

Q = 10


def _tiny_bert():
    from transformers import BertConfig

    return BertTextEncoder.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64))


def _cfg(**over):
    model = {
        "backbone": "swin_custom",
        "swin": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 2,
                 "drop_path_rate": 0.0},
        "hidden_dim": 64, "nheads": 4, "num_queries": Q, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 128,
        "dropout_ratio": 0.0, "two_stage_type": "standard", "max_text_len": 16, "num_feature_levels": 4,
        "return_interm_indices": [1, 2, 3, 4], "text_encoder_type": "unused", "log_scale": None,
        "class_embed_bias": False,
    }
    model.update(over)
    return {"model": model}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg(), text_encoder=_tiny_bert())


def _inputs(b=2, size=128):
    ids = torch.tensor([[101, 4937, 1012, 3899, 1012, 102], [101, 4937, 1012, 102, 0, 0]])[:b]
    att = (ids > 0).long()
    block = torch.eye(6, dtype=torch.bool)[None].repeat(b, 1, 1)
    block[:, 1:3, 1:3] = True
    block[0, 3:5, 3:5] = True
    pos = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0]])[:b]
    torch.manual_seed(1)
    images = torch.randn(b, 3, size, size)
    pixel_mask = torch.ones(b, size, size, dtype=torch.bool)
    if b > 1:
        pixel_mask[1, :, 96:] = False
    return images, pixel_mask, ids, att, pos, torch.zeros_like(ids), block


def test_eval_outputs_shapes_and_masking(model):
    model.eval()
    images, pm, ids, att, pos, tt, block = _inputs()
    with torch.no_grad():
        out = model(images, pm, ids, att, pos, tt, block)
    assert out["pred_logits"].shape == (2, Q, 16)
    assert out["pred_boxes"].shape == (2, Q, 4)
    assert out["pred_masks"].shape == (2, Q, 1, 32, 32)  # stride 4 of 128 px
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, Q, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (2, Q, 16)
    logits = out["pred_logits"]
    # −inf exactly on padded tokens and beyond the caption
    assert torch.isfinite(logits[0, :, :6]).all() and torch.isinf(logits[0, :, 6:]).all()
    assert torch.isfinite(logits[1, :, :4]).all() and torch.isinf(logits[1, :, 4:]).all()
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert torch.isfinite(out["pred_masks"]).all()


def test_training_with_match_fn_predicts_matched_masks_and_backprops(model):
    model.train()
    images, pm, ids, att, pos, tt, block = _inputs()
    calls = []

    def match_fn(layer_out, targets):
        calls.append(layer_out["pred_boxes"].shape)
        assert targets == "T"
        return [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([5]), torch.tensor([0]))]

    out = model(images, pm, ids, att, pos, tt, block, targets="T", match_fn=match_fn)
    assert len(calls) == 2  # one match per decoder layer
    assert [m.shape for m in out["pred_masks"]] == [(2, 1, 32, 32), (1, 1, 32, 32)]
    assert out["mask_indices"][0][0].tolist() == [0, 3]
    assert [m.shape for m in out["aux_outputs"][0]["pred_masks"]] == [(2, 1, 32, 32), (1, 1, 32, 32)]
    finite = out["pred_logits"][torch.isfinite(out["pred_logits"])]
    loss = (finite.mean() + out["pred_boxes"].sum() + sum(m.mean() for m in out["pred_masks"])
            + out["interm_outputs"]["pred_boxes"].sum()
            + out["interm_outputs"]["pred_logits"][torch.isfinite(out["interm_outputs"]["pred_logits"])].mean()
            + sum(m.mean() for m in out["aux_outputs"][0]["pred_masks"]))
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for name in ("controller.layers.0.weight", "mask_head.lay2.weight", "feat_map.weight",
                 "backbone.0.body.patch_embed.proj.weight", "bert.embeddings.word_embeddings.weight",
                 "transformer.encoder.fusion_layers.0.gamma_v", "transformer.decoder.layers.1.ca_text.in_proj_weight",
                 "transformer.enc_out_bbox_embed.layers.2.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    model.eval()


def test_training_without_match_fn_gives_all_query_masks(model):
    model.train()
    images, pm, ids, att, pos, tt, block = _inputs(b=1)
    out = model(images, pm, ids, att, pos, tt, block)
    assert out["pred_masks"].shape == (1, Q, 1, 32, 32)
    model.eval()


def test_none_pixel_mask_equals_all_valid(model):
    model.eval()
    images, _, ids, att, pos, tt, block = _inputs(b=1)
    with torch.no_grad():
        a = model(images, None, ids, att, pos, tt, block)
        b = model(images, torch.ones(1, 128, 128, dtype=torch.bool), ids, att, pos, tt, block)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"])


def test_dynamic_mask_logits_matches_per_instance_conv():
    torch.manual_seed(0)
    b, c, h, w, n = 2, 2, 5, 6, 3
    feats = torch.randn(b, c, h, w)
    p = (c + 2) * 8 + 8 * 8 + 8 + 8 + 8 + 1
    params = torch.randn(b, n, p) * 0.3
    centres = torch.rand(b, n, 2) * 40
    out = dynamic_mask_logits(feats, params, centres)
    assert out.shape == (b, n, 1, 2 * h, 2 * w)
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0 + 4, torch.arange(w) * 8.0 + 4, indexing="ij")
    for i in range(b):
        for j in range(n):
            q = params[i, j]
            w1, w2, w3 = q[:32].view(8, 4, 1, 1), q[32:96].view(8, 8, 1, 1), q[96:104].view(1, 8, 1, 1)
            b1, b2, b3 = q[104:112], q[112:120], q[120:121]
            rel = torch.stack((centres[i, j, 0] - xs, centres[i, j, 1] - ys))[None]
            x = torch.cat((rel, feats[i:i + 1]), 1)
            x = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, w1, b1)), w2, b2)), w3, b3)
            torch.testing.assert_close(out[i, j], aligned_bilinear(x, 2)[0], atol=1e-4, rtol=1e-4)


def test_aligned_bilinear_keeps_constants_and_doubles_size():
    x = torch.full((1, 1, 3, 4), 2.5)
    y = aligned_bilinear(x, 2)
    assert y.shape == (1, 1, 6, 8)
    torch.testing.assert_close(y, torch.full_like(y, 2.5))
    # input pixel (i, j) lands at output (2i, 2j) after the half-pixel shift... except the replicated border
    x = torch.arange(12.0).view(1, 1, 3, 4)
    y = aligned_bilinear(x, 2)
    torch.testing.assert_close(y[0, 0, 1::2, 1::2], x[0, 0])


def test_sine_embed_layout():
    pos = torch.tensor([[3.0]])
    e = sine_embed(pos[..., None], 8)[0, 0]
    dim_t = 10000 ** (2 * (torch.arange(8) // 2) / 8)
    ref = 3.0 * 2 * torch.pi / dim_t
    torch.testing.assert_close(e[0::2], ref[0::2].sin())
    torch.testing.assert_close(e[1::2], ref[1::2].cos())
    box = torch.tensor([0.1, 0.2, 0.3, 0.4])
    e4 = sine_embed(box, 8)
    singles = [sine_embed(v.view(1), 8) for v in box]
    torch.testing.assert_close(e4, torch.cat([singles[1], singles[0], singles[2], singles[3]]))  # y, x, w, h


def test_contrastive_embed_padding_and_scales():
    x = torch.randn(1, 3, 8)
    t = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, True, False]])
    out = ContrastiveEmbed(6)(x, t, mask)
    assert out.shape == (1, 3, 6)
    torch.testing.assert_close(out[..., :3], x @ t[:, :3].transpose(1, 2))
    assert torch.isinf(out[..., 3:]).all()
    auto = ContrastiveEmbed(6, "auto", dim=8)(x, t, mask)
    torch.testing.assert_close(auto[..., :3], out[..., :3] / 8 ** 0.5)
    biased = ContrastiveEmbed(6, None, bias=True)
    assert [n for n, _ in biased.named_parameters()] == ["bias"]
    assert list(ContrastiveEmbed(6, 0.0).state_dict()) == ["log_scale"]


def test_swin_table_and_config_errors():
    assert SWIN_BACKBONES["swin_base_224_22k"][1] == [2, 2, 12, 2]
    assert SWIN_BACKBONES["swin_tiny_224_1k"] == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    with pytest.raises(ConfigError) as err:
        build_model(_cfg(backbone="resnet_9"), text_encoder=_tiny_bert())
    assert err.value.subject == "model.backbone"
    with pytest.raises(ConfigError) as err:
        build_model(_cfg(num_feature_levels=3), text_encoder=_tiny_bert())
    assert err.value.subject == "model.num_feature_levels"
    with pytest.raises(ConfigError):
        build_model(_cfg(hidden_dim=48), text_encoder=_tiny_bert())


def test_two_stage_no_and_frozen_backbone():
    torch.manual_seed(0)
    m = build_model(_cfg(two_stage_type="no", train_backbone=False, dec_layers=1), text_encoder=_tiny_bert()).eval()
    assert not any(p.requires_grad for p in m.swin.parameters())
    images, pm, ids, att, pos, tt, block = _inputs(b=1)
    with torch.no_grad():
        out = m(images, pm, ids, att, pos, tt, block)
    assert "interm_outputs" not in out and out["pred_boxes"].shape == (1, Q, 4)


def test_load_pretrained_tao_and_idea_layouts(model):
    torch.manual_seed(3)
    fresh = build_model(_cfg(), text_encoder=_tiny_bert())
    sd = model.state_dict()
    # TAO Lightning checkpoint
    tao = {"state_dict": {"model.model." + k: v for k, v in sd.items()}}
    report = load_pretrained(fresh, tao)
    assert report.clean
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # IDEA GroundingDINO checkpoint: module. prefix, backbone.0.<swin>, a BERT pooler, no mask head
    idea = {}
    for k, v in sd.items():
        if k.startswith(("controller.", "mask_head.")):
            continue
        idea["module." + k.replace("backbone.0.body.", "backbone.0.")] = v
    idea["module.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    report = load_pretrained(build_model(_cfg(), text_encoder=_tiny_bert()), {"model": idea})
    assert not report.unexpected and not report.mismatched
    assert report.missing and all(k.startswith(("controller.", "mask_head.")) for k in report.missing)
    assert "bert.pooler.dense.weight" in report.benign
    # a different text width is reported, not silently loaded
    bad = dict(sd)
    bad["feat_map.weight"] = torch.zeros(64, 768)
    report = load_pretrained(build_model(_cfg(), text_encoder=_tiny_bert()), bad)
    assert [m[0] for m in report.mismatched] == ["feat_map.weight"]


def test_state_dict_uses_tao_names(model):
    keys = set(model.state_dict())
    for k in ("backbone.0.body.norm1.weight", "backbone.0.body.layers.0.blocks.0.attn.qkv.weight", "feat_map.weight",
              "input_proj.3.0.weight", "transformer.level_embed", "transformer.tgt_embed.weight",
              "transformer.enc_output_norm.weight", "transformer.enc_out_bbox_embed.layers.2.bias",
              "transformer.encoder.text_layers.0.self_attn.in_proj_weight",
              "transformer.encoder.fusion_layers.0.attn.values_l_proj.weight",
              "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
              "transformer.decoder.layers.0.catext_norm.weight", "transformer.decoder.ref_point_head.layers.1.bias",
              "transformer.decoder.norm.weight", "transformer.decoder.bbox_embed.1.layers.0.weight",
              "bbox_embed.0.layers.2.weight", "controller.layers.2.weight", "mask_head.jia_dcn.weight"):
        assert k in keys, k
    assert model.controller.layers[2].out_features == (2 + 64 // 32) * 8 + 64 + 8 + 17
    # one shared box head
    assert model.bbox_embed[0] is model.bbox_embed[1] is model.transformer.decoder.bbox_embed[1]
    assert isinstance(model, MaskGDinoModel)


def test_activation_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    m = build_model(_cfg(enc_layers=1, dec_layers=1), text_encoder=_tiny_bert()).train()
    images, pm, ids, att, pos, tt, block = _inputs(b=1, size=64)

    def grads(enabled):
        m.set_activation_checkpoint(enabled)
        m.zero_grad()
        torch.manual_seed(7)  # same dropout / drop-path draws (checkpointing replays the RNG state)
        out = m(images, pm, ids, att, pos, tt, block)
        (out["pred_boxes"].sum() + out["pred_masks"].mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys() and "transformer.encoder.fusion_layers.0.gamma_v" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_load_backbone_weights_from_a_release_file(tmp_path, model):
    from networks.common.errors import CheckpointError
    from networks.mask_grounding_dino.model import load_backbone_weights

    path = tmp_path / "swin.pth"
    torch.save({"model": {k: v.clone() for k, v in model.swin.state_dict().items()}}, path)
    torch.manual_seed(5)
    fresh = build_model(_cfg(), text_encoder=_tiny_bert())
    report = load_backbone_weights(fresh, path)
    assert report.clean
    assert torch.equal(fresh.swin.patch_embed.proj.weight, model.swin.patch_embed.proj.weight)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(fresh, tmp_path / "missing.pth")
    assert err.value.subject == "model.pretrained_backbone_path"
