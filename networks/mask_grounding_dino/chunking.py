"""Prompts longer than the text window: split into chunks, run each, merge (evaluate and inference).

Grounding DINO reads at most ``model.max_text_len`` tokens (256).  A label map whose prompt
``"n0 . n1 . ... ."`` is longer (LVIS: 4,283 tokens) would lose its last classes; TAO clips the positive map
silently.  Here the class names are split into consecutive chunks that each fit (a name is never split), every
chunk becomes its own *view* of the image (same pixels, the chunk's prompt), and the views' outputs are merged
into one output per image, as if the model had one text window holding every chunk side by side:

* queries: the views' queries are stacked (``V·Q`` candidates per image);
* tokens: the views' token axes are concatenated (``V·L``); a query of view ``v`` has its own logits on view
  ``v``'s tokens and ``-inf`` (probability 0) on the others;
* positive map: block-diagonal, class ``c`` of chunk ``v`` marks its tokens at view ``v``'s offset.

The usual post-processing then gives each class its score from the chunk that holds it (``sigmoid(logits) @
normalised positive map`` is 0 off the block), one candidate set across chunks, then top-k and NMS — the same
code as an unchunked prompt.  What is *not* the same as one long window: each chunk's image–text fusion sees
only that chunk's names, so a class's score depends on the other names in its chunk (as it depends on the other
names of any prompt); ``docs/mask_grounding_dino.md`` states the limit.

Layout of a chunked batch (:func:`expand_views`): every per-sample list and tensor holds one entry per *view*,
and ``batch["views"]`` is ``{"image_of_row": [...], "offsets": [...]}`` (the sample index of each row and the
index of its chunk's first class in the sample's names).  :func:`merge_views` turns the model's per-view
outputs and the batch back into one entry per sample.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["prompt_token_count", "chunk_names", "expand_views", "merge_views"]


def prompt_token_count(token_lengths: Sequence[int]) -> int:
    """Tokens of the prompt "n0 . n1 . ... ." with [CLS]/[SEP]: 2 + Σ (tokens(name) + 1)."""
    return 2 + sum(int(n) + 1 for n in token_lengths)


def chunk_names(names: Sequence[str], tokens: Callable[[str], int], max_text_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive ``names`` whose prompt fits in ``max_text_len`` tokens; one range
    when everything fits.  A name too long for the window on its own gets a range of its own (its tokens are cut,
    so it cannot be detected; the collator warns)."""
    ranges: list[tuple[int, int]] = []
    start, used = 0, 2  # [CLS] and [SEP]
    for k, name in enumerate(names):
        need = int(tokens(name)) + 1  # the name and its " ."
        if k > start and used + need > max_text_len:
            ranges.append((start, k))
            start, used = k, 2
        used += need
    if names:
        ranges.append((start, len(names)))
    return ranges


def expand_views(samples: list[dict], ranges: list[list[tuple[int, int]]]) -> tuple[list[dict], dict[str, list]]:
    """One sample dict per (sample, chunk): ``names`` (and ``category_ids``) cut to the chunk, ``target`` keeping
    the chunk's objects with labels renumbered from 0; returns the views and ``{"image_of_row", "offsets"}``."""
    views: list[dict] = []
    image_of_row: list[int] = []
    offsets: list[int] = []
    for i, (s, rs) in enumerate(zip(samples, ranges, strict=True)):
        for a, b in rs:
            v = dict(s)
            v["names"] = list(s["names"][a:b])
            if "category_ids" in s:
                v["category_ids"] = list(s["category_ids"][a:b])
            t = dict(s["target"])
            labels = t["labels"]
            keep = (labels >= a) & (labels < b)
            t["labels"] = labels[keep] - a
            for key in ("boxes", "masks"):
                if key in t and t[key].shape[0] == labels.shape[0]:
                    t[key] = t[key][keep]
            v["target"] = t
            views.append(v)
            image_of_row.append(i)
            offsets.append(a)
    return views, {"image_of_row": image_of_row, "offsets": offsets}


def _rows_of(image_of_row: Sequence[int]) -> list[list[int]]:
    rows: list[list[int]] = []
    for r, i in enumerate(image_of_row):
        while len(rows) <= i:
            rows.append([])
        rows[i].append(r)
    return rows


def _block_logits(logits: torch.Tensor, rows: list[int], width: int) -> torch.Tensor:
    """[V·Q, V·L]: view ``v``'s logits [Q, L] at block (v, v), ``-inf`` elsewhere, then padded to ``width``
    queries-by-tokens columns (``-inf``)."""
    Q, L = logits.shape[1:]
    out = logits.new_full((len(rows) * Q, width), float("-inf"))
    for v, r in enumerate(rows):
        out[v * Q:(v + 1) * Q, v * L:(v + 1) * L] = logits[r]
    return out


def merge_views(outputs: dict[str, Any], batch: dict) -> tuple[dict[str, Any], dict]:
    """Per-sample outputs and batch from a batch of views (see the module docstring); an unchunked batch is
    returned as it is.

    Outputs: ``pred_logits`` [B, Vmax·Q, Vmax·L] (block layout, ``-inf`` padding), ``pred_boxes``
    [B, Vmax·Q, 4], ``pred_masks`` [B, Vmax·Q, h, w] when present, ``text_token_mask`` [B, Vmax·L];
    ``no_targets`` (ReLA) is kept only when every view of a sample says no target; ``union_mask_logits`` is
    dropped (one union per view has no merged meaning).  Batch: ``names``/``category_ids`` and the tokens
    (``input_ids`` …) concatenated over a sample's views, ``targets`` with the objects of all views (labels
    offset back) and the block-diagonal ``positive_map``; per-image fields from the sample's first view.
    """
    views = batch.get("views")
    if views is None:
        return outputs, batch
    rows = _rows_of(views["image_of_row"])
    logits = outputs["pred_logits"]
    Q, L = logits.shape[1:]
    vmax = max(len(r) for r in rows)
    merged: dict[str, Any] = {
        "pred_logits": torch.stack([_block_logits(logits, r, vmax * L) for r in rows]),
        "pred_boxes": torch.stack([_pad_rows(outputs["pred_boxes"][r].flatten(0, 1), vmax * Q) for r in rows]),
        "text_token_mask": torch.stack([_pad_rows(outputs["text_token_mask"][r].flatten(0, 1), vmax * L)
                                        for r in rows]),
    }
    # a sample with fewer views than vmax has padded candidate slots: logits -inf (score 0), boxes and masks 0
    masks = outputs.get("pred_masks")
    if isinstance(masks, torch.Tensor):
        m = masks[:, :, 0] if masks.dim() == 5 else masks
        merged["pred_masks"] = torch.stack([_pad_rows(m[r].flatten(0, 1), vmax * Q) for r in rows])
    if isinstance(outputs.get("no_targets"), torch.Tensor):
        nt = outputs["no_targets"]
        says_none = nt.argmax(-1) == 1
        merged["no_targets"] = torch.stack([nt[r[0]] if bool(says_none[r].all()) else
                                            torch.tensor([1.0, 0.0], dtype=nt.dtype, device=nt.device)
                                            for r in rows])
    out_batch = _merge_batch(batch, rows, L, vmax)
    return merged, out_batch


def _pad_rows(x: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    pad = x.new_full((n - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def _merge_batch(batch: dict, rows: list[list[int]], L: int, vmax: int) -> dict:
    offsets = batch["views"]["offsets"]
    out = {k: v for k, v in batch.items() if k not in ("views", "text_self_attention_masks")}
    for key in ("images", "pixel_mask"):
        if key in batch:
            out[key] = batch[key][[r[0] for r in rows]]
    per_row = [k for k in ("image_ids", "file_names", "orig_sizes", "image_sizes", "paths", "referring")
               if k in batch]
    for k in per_row:
        out[k] = [batch[k][r[0]] for r in rows]
    out["names"] = [[n for j in r for n in batch["names"][j]] for r in rows]
    if "category_ids" in batch:
        out["category_ids"] = [[c for j in r for c in batch["category_ids"][j]] for r in rows]
    out["captions"] = [" | ".join(batch["captions"][j] for j in r) for r in rows]
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if key in batch:
            out[key] = torch.stack([_pad_rows(batch[key][r].flatten(), vmax * L) for r in rows])
    targets = []
    for r in rows:
        first = batch["targets"][r[0]]
        t = dict(first)
        t["labels"] = torch.cat([batch["targets"][j]["labels"] + offsets[j] for j in r])
        for key in ("boxes", "masks"):
            if key in first:
                t[key] = torch.cat([batch["targets"][j][key] for j in r])
        t["positive_map"] = torch.block_diag(*[batch["targets"][j]["positive_map"][:, :L] for j in r])
        t["positive_map"] = torch.nn.functional.pad(t["positive_map"], (0, vmax * L - t["positive_map"].shape[1]))
        targets.append(t)
    out["targets"] = targets
    return out
