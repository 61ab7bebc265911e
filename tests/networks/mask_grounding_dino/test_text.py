"""Prompts, tokenisation, phrase masks and positive maps (TAO §2.4), with HF's reference for the phrase masks."""
from __future__ import annotations

import torch

from networks.mask_grounding_dino.text import (
    build_caption,
    decode_phrase,
    normalize_rows,
    phrase_masks,
    positive_map,
    tokenize,
)


def test_build_caption_spans():
    cap, spans = build_caption(["cat", "hot dog", "dog"])
    assert cap == "cat . hot dog . dog ."
    assert [cap[s:e] for s, e in spans] == ["cat", "hot dog", "dog"]


def test_phrase_positions_and_block_mask(tokenizer):
    tok = tokenize(["cat . dog ."], tokenizer, 256)
    assert tok["input_ids"][0].tolist() == [101, 4937, 1012, 3899, 1012, 102]
    assert tok["position_ids"][0].tolist() == [0, 0, 1, 0, 1, 0]
    m = tok["text_self_attention_masks"][0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, expected)
    assert tok["attention_mask"].dtype == torch.bool and tok["attention_mask"].all()


def test_phrase_masks_match_hf_reference(tokenizer):
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        generate_masks_with_special_tokens_and_transfer_map,
    )

    caps = ["red circle . square . a big blue triangle .", "cat ."]
    tok = tokenize(caps, tokenizer, 256)
    special = torch.tensor([101, 102, 1012, 1029])
    ref_mask, ref_pos = generate_masks_with_special_tokens_and_transfer_map(tok["input_ids"], special)
    assert torch.equal(tok["text_self_attention_masks"], ref_mask.bool())
    assert torch.equal(tok["position_ids"], ref_pos.long())


def test_positive_map_whole_phrase_not_substring(tokenizer):
    names = ["carrot", "car"]
    cap, spans = build_caption(names)
    tok = tokenize([cap], tokenizer, 256)
    pm = positive_map(spans, tok["offsets"][0], 256)
    ids = tok["input_ids"][0]
    car_tokens = tokenizer("car", add_special_tokens=False)["input_ids"]
    # row of "car" marks the token after "carrot ." — not the first token of "carrot"
    assert pm[1].sum() == len(car_tokens)
    assert ids[pm[1].bool()[: ids.shape[0]]].tolist() == car_tokens
    assert (pm[0] * pm[1]).sum() == 0


def test_cut_to_max_text_len_and_dropped_rows(tokenizer):
    names = [f"category{i}" for i in range(10)]
    cap, spans = build_caption(names)
    tok = tokenize([cap], tokenizer, 12)
    assert tok["input_ids"].shape == (1, 12) and tok["text_self_attention_masks"].shape == (1, 12, 12)
    pm = positive_map(spans, tok["offsets"][0], 12)
    assert pm.shape == (10, 12)
    assert pm[0].sum() > 0 and pm[-1].sum() == 0  # categories past the window get empty rows


def test_normalize_rows_and_decode_phrase(tokenizer):
    pm = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(normalize_rows(pm), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    cap, spans = build_caption(["big red circle"])
    tok = tokenize([cap], tokenizer, 256)
    row = positive_map(spans, tok["offsets"][0], 256)[0]
    L = tok["input_ids"].shape[1]
    probs = torch.zeros(L)
    probs[2:4] = 0.9  # "red circle"
    assert decode_phrase(probs, tok["input_ids"][0], row[:L], tokenizer, 0.3) == "red circle"
    assert decode_phrase(probs, tok["input_ids"][0], row[:L], tokenizer, 0.95) == ""


def test_phrase_masks_padding_attends_to_itself():
    ids = torch.tensor([[101, 5, 1012, 102, 0, 0]])
    mask, pos = phrase_masks(ids, {101, 102, 1012})
    assert mask[0, 4].int().tolist() == [0, 0, 0, 0, 1, 0]
    assert pos[0].tolist() == [0, 0, 1, 0, 0, 0]
