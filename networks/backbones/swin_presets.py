"""TAO's Swin Transformer variants as plain data (no torch import), shared by the backbone and the spec modules.

Two naming schemes name the same table:

* Mask2Former's ``model.backbone.swin.type``: ``tiny`` / ``small`` / ``base`` / ``large`` (architecture only; the
  window size is its own spec field);
* Grounding DINO's ``model.backbone``: ``swin_<size>_<resolution>_<pretraining>`` with the window size fixed by
  the name, plus the IDEA GroundingDINO spellings (``swin_T_224_1k``, ...) as aliases.
"""
from __future__ import annotations

__all__ = ["SWIN_PRESETS", "SWIN_BACKBONES", "SWIN_BACKBONE_ALIASES", "swin_backbone"]

#: name -> (embed_dim, depths, num_heads), as used by TAO's ``model.backbone.swin.type``.
SWIN_PRESETS: dict[str, tuple[int, list[int], list[int]]] = {
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}

#: Grounding DINO ``model.backbone`` -> (embed_dim, depths, num_heads, window_size), TAO's table.
#: ``swin_base_224_22k`` keeps TAO's depths 2,2,12,2 (the official Swin-B, ``base`` above, has 2,2,18,2).
SWIN_BACKBONES: dict[str, tuple[int, list[int], list[int], int]] = {
    "swin_tiny_224_1k": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
    "swin_base_224_22k": (128, [2, 2, 12, 2], [4, 8, 16, 32], 7),
    "swin_base_384_22k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
    "swin_large_224_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 7),
    "swin_large_384_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
}

#: IDEA GroundingDINO's names (TAO's ``swin_transformer.py`` factories) for the same backbones.
SWIN_BACKBONE_ALIASES: dict[str, str] = {
    "swin_T_224_1k": "swin_tiny_224_1k",
    "swin_B_224_22k": "swin_base_224_22k",
    "swin_B_384_22k": "swin_base_384_22k",
    "swin_L_224_22k": "swin_large_224_22k",
    "swin_L_384_22k": "swin_large_384_22k",
}


def swin_backbone(name: str) -> tuple[int, list[int], list[int], int] | None:
    """(embed_dim, depths, num_heads, window_size) of a Grounding DINO backbone name or alias; None if unknown.

    The lists are fresh copies (callers may mutate them).
    """
    entry = SWIN_BACKBONES.get(SWIN_BACKBONE_ALIASES.get(name, name))
    if entry is None:
        return None
    embed, depths, heads, window = entry
    return embed, list(depths), list(heads), window
