"""``tao dataset convert``: pick the conversion for ``--from``/``--to``, check its options, run it.

The conversions themselves live in :mod:`networks.common.dataset_convert` (the library never imports the CLI);
this module only maps the command line onto them and refuses option combinations that would be ignored.
"""
from __future__ import annotations

from pathlib import Path

from networks.common import dataset_convert as dc
from networks.common.errors import ConfigError

__all__ = ["CONVERSIONS", "convert", "summary_lines"]

#: (from, to) → what it does, as ``tao dataset convert --help`` and docs/datasets.md list it
CONVERSIONS: dict[tuple[str, str], str] = {
    ("coco", "odvg"): "COCO instances → ODVG detection JSON lines + label map",
    ("coco", "odvg_grounding"): "COCO instances + captions → ODVG grounding JSON lines",
    ("odvg", "coco"): "ODVG detection JSON lines + label map → COCO instances (evaluation file)",
    ("coco_panoptic", "semantic"): "COCO panoptic → semantic PNGs + semantic.jsonl + label_map.json",
}

# the options each conversion reads; any other one given is refused rather than silently ignored
_USES: dict[tuple[str, str], set[str]] = {
    ("coco", "odvg"): {"label_map"},
    ("coco", "odvg_grounding"): {"captions"},
    ("odvg", "coco"): {"label_map", "categories", "images"},
    ("coco_panoptic", "semantic"): {"images", "panoptic_dir"},
}

_FLAG = {"label_map": "--label-map", "captions": "--captions", "categories": "--categories", "images": "--images",
         "panoptic_dir": "--panoptic-dir"}


def convert(src: Path, from_format: str, to_format: str, out: Path, *, label_map: Path | None = None,
            captions: Path | None = None, categories: Path | None = None, images: Path | None = None,
            panoptic_dir: Path | None = None) -> dc.ConvertResult:
    """Run the ``from_format`` → ``to_format`` conversion of ``src`` into ``out``.

    ``out`` is the output file for ``odvg``, ``odvg_grounding`` and ``coco`` and the output directory for
    ``semantic``.  ``label_map`` is where the ODVG label map is written (coco → odvg; default
    ``<out stem>_labelmap.json``) or read (odvg → coco, required).  ConfigError (one line) for an unsupported pair,
    a missing required option, or an option the conversion would not use.
    """
    pair = (from_format, to_format)
    if pair not in CONVERSIONS:
        known = ", ".join(f"{a}→{b}" for a, b in CONVERSIONS)
        raise ConfigError("--from/--to", f"no conversion from {from_format!r} to {to_format!r}",
                          f"supported: {known}")
    given = {"label_map": label_map, "captions": captions, "categories": categories, "images": images,
             "panoptic_dir": panoptic_dir}
    extra = [_FLAG[k] for k, v in given.items() if v is not None and k not in _USES[pair]]
    if extra:
        raise ConfigError(extra[0], f"is not used when converting {from_format} to {to_format}",
                          f"options for this conversion: {', '.join(sorted(_FLAG[k] for k in _USES[pair])) or 'none'}")
    if pair == ("coco", "odvg"):
        return dc.coco_to_odvg(src, out, label_map_out=label_map)
    if pair == ("coco", "odvg_grounding"):
        return dc.coco_to_odvg(src, out, captions=captions, grounding=True)
    if pair == ("odvg", "coco"):
        if label_map is None:
            raise ConfigError("--label-map", "is required to convert odvg to coco",
                              "give the label map written with the ODVG file (annotations_odvg_labelmap.json)")
        return dc.odvg_to_coco(src, label_map, out, categories_from=categories, image_dir=images)
    return dc.panoptic_to_semantic(src, out, panoptic_dir=panoptic_dir, image_dir=images)


def summary_lines(result: dc.ConvertResult) -> list[str]:
    """What the command prints: one ``wrote PATH`` line per output, the counts on one line, then the notes."""
    lines = [f"wrote {p}" for p in result.written]
    if result.counts:
        lines.append(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in result.counts.items()))
    lines.extend(f"note: {n}" for n in result.notes)
    return lines
