"""Acceptance: a random tiny HF Mask2Former converted with convert.py gives the same outputs as our model.

Every decoder prediction (before layer 0 and after each layer) must match: class logits after rolling the class
axis, and mask logits, within 1e-4 in fp32 eval mode.  Built from configs only (HF_HUB_OFFLINE=1, nothing is
downloaded).  The input is 256x288 so no Swin stage is smaller than the window (HF would shrink the window).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from networks.mask2former.convert import hf_config_to_spec_overrides, hf_to_tao_state_dict  # noqa: E402
from networks.mask2former.model import build_model  # noqa: E402

NUM_LABELS = 5


def _tiny_hf_model(seed: int = 0, pre_norm: bool = False):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    swin = SwinConfig(image_size=224, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                      window_size=7, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=64, mask_feature_size=64, hidden_dim=64,
                            encoder_feedforward_dim=1024, encoder_layers=2, decoder_layers=4, num_attention_heads=4,
                            dim_feedforward=128, num_queries=10, num_labels=NUM_LABELS, dropout=0.0, pre_norm=pre_norm,
                            use_pretrained_backbone=False, output_auxiliary_logits=True)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    # HF init leaves sampling offsets/attention weights degenerate (zero weights); perturb every parameter so
    # that each mapped tensor influences the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


@pytest.mark.parametrize("pre_norm, batch", [(False, 2), (True, 1)])
def test_tiny_hf_model_matches_every_decoder_layer(pre_norm, batch):
    hf, cfg = _tiny_hf_model(pre_norm=pre_norm)
    spec = hf_config_to_spec_overrides(cfg)["model"]
    assert spec["backbone"]["swin"]["type"] == "custom"
    assert spec["mask_former"]["pre_norm"] is pre_norm
    assert spec["mask_former"]["dec_layers"] == 4
    ours = build_model(spec).eval()
    sd = hf_to_tao_state_dict(hf.state_dict(), NUM_LABELS)
    ours.load_state_dict(sd, strict=True)

    torch.manual_seed(1)
    x = torch.randn(batch, 3, 256, 288)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        out = ours(x)

    ref_logits = [a["class_queries_logits"] for a in ref.auxiliary_logits] + [ref.class_queries_logits]
    ref_masks = [a["masks_queries_logits"] for a in ref.auxiliary_logits] + [ref.masks_queries_logits]
    our_logits = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
    our_masks = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    assert len(our_logits) == len(ref_logits) == 4
    for k, (a, b) in enumerate(zip(our_logits, ref_logits, strict=True)):
        assert a.shape == (batch, 10, NUM_LABELS + 1)
        # TAO column 0 = no object = HF last column
        torch.testing.assert_close(a[..., 0], b[..., -1], atol=1e-4, rtol=0, msg=f"no-object logits, prediction {k}")
        torch.testing.assert_close(a[..., 1:], b[..., :-1], atol=1e-4, rtol=0, msg=f"class logits, prediction {k}")
    for k, (a, b) in enumerate(zip(our_masks, ref_masks, strict=True)):
        assert a.shape == (batch, 10, 64, 72)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"mask logits, prediction {k}")
    # the attention masks must actually have been exercised (some queries blocked from some pixels)
    assert (ref_masks[0] < 0).any() and (ref_masks[0] > 0).any()


def test_convert_rejects_unknown_keys_and_wrong_class_count():
    from networks.common.errors import CheckpointError

    hf, _ = _tiny_hf_model()
    sd = dict(hf.state_dict())
    with pytest.raises(CheckpointError, match="rows"):
        hf_to_tao_state_dict(sd, NUM_LABELS + 1)
    sd["model.something_else.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unrecognised"):
        hf_to_tao_state_dict(sd, NUM_LABELS)


def test_convert_accepts_transformers4_key_layout():
    """Hub checkpoints use the transformers-4 names (attention.self.query, encoder.embeddings, ...)."""
    hf, _ = _tiny_hf_model()
    v5 = hf.state_dict()
    v4 = {}
    for k, v in v5.items():
        k4 = k.replace("pixel_level_module.encoder.swin.", "pixel_level_module.encoder.")
        for a, b in (("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
                     ("attention.v_proj", "attention.self.value"), ("attention.o_proj", "attention.output.dense"),
                     ("attention.relative_position_bias.", "attention.self."), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")):
            if ".blocks." in k4:
                k4 = k4.replace(a, b)
        v4[k4] = v
    a = hf_to_tao_state_dict(v5, NUM_LABELS)
    b = hf_to_tao_state_dict(v4, NUM_LABELS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
