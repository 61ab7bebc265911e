"""Batching images of different sizes: one padding helper and one mask convention for every network.

The mask is ``pixel_mask`` [B, H, W] bool with **True = valid image pixel** (False = padding), as Hugging Face's
``pixel_mask``.  A model that needs the opposite polarity internally (a key-padding mask, True = ignore) converts
at its own boundary with ``~pixel_mask``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["padded_size", "pad_images"]


def padded_size(sizes: Sequence[tuple[int, int]], size_divisibility: int = 32) -> tuple[int, int]:
    """``(H, W)``: the largest height and width of ``sizes`` ((h, w) pairs), each rounded up to a multiple of
    ``size_divisibility``."""
    d = int(size_divisibility)
    H = int(math.ceil(max(h for h, _ in sizes) / d) * d)
    W = int(math.ceil(max(w for _, w in sizes) / d) * d)
    return H, W


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [C, h, w] images into ``(batch [B, C, H, W], pixel_mask [B, H, W] bool)``.

    Each image sits at the top-left; the bottom/right padding is 0 (after normalisation, i.e. the mean colour)
    and False in ``pixel_mask`` (True = valid pixel).  (H, W) is :func:`padded_size`.  ``batch`` has the dtype
    and device of the first image; ``pixel_mask`` is on the CPU, as a DataLoader collate produces it.
    """
    H, W = padded_size([(int(im.shape[-2]), int(im.shape[-1])) for im in images], size_divisibility)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], H, W))
    pixel_mask = torch.zeros((len(images), H, W), dtype=torch.bool)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        batch[i, :, :h, :w] = im
        pixel_mask[i, :h, :w] = True
    return batch, pixel_mask
