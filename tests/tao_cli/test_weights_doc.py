"""docs/weights.md: every ``$ tao weights ...`` line of its ``console`` blocks runs and succeeds on tiny stand-ins
of the files it names, prints each output line the page shows under it, and says what the page says it does.

Stand-ins (random weights, offline, under the real files' names and in their layouts):

* MAL: MAE / DeiT ViT releases (``{"model": ...}``), a TAO MAL checkpoint (the key list of
  ``tests/networks/mal/data/tao_mal_tiny_keys.json``), a tao-cli MAL checkpoint; tagged tao-cli Mask2Former and
  Mask Grounding DINO checkpoints.
* Mask2Former: a tiny ``Mask2FormerForUniversalSegmentation`` written by ``save_pretrained``
  (``mask2former-swin-tiny-coco-instance/``), the same weights under detectron2 names as a model-zoo ``.pkl`` of
  numpy arrays (``model_final_86143f.pkl``), a tiny timm Swin as a Microsoft release
  (``swin_tiny_patch4_window7_224.pth``, ``{"model": ...}``) and as a timm hub directory
  (``swin_tiny_patch4_window7_224.ms_in1k/``: ``config.json`` + ``model.safetensors``).
* Mask Grounding DINO: a tiny ``GroundingDinoForObjectDetection`` (``grounding-dino-tiny/``) and the same weights
  under IDEA GroundingDINO's names (``groundingdino_swint_ogc.pth``, ``{"model": {"module.<key>": ...}}``).

The converted files are then used: ``m2f.pth`` loads through the export/evaluate loader into the model the HF
config sizes with exactly the tensors the HF directory gives (and HF's outputs within 1e-4); ``gd.pth`` holds
exactly the tensors the IDEA file converts to.
"""
from __future__ import annotations

import json
import pickle
import re
import shlex
from functools import partial
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tao_cli.cli import app

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "weights.md"
KEYS = REPO / "tests/networks/mal/data/tao_mal_tiny_keys.json"
M2F_HF = "mask2former-swin-tiny-coco-instance"
GDINO_MASK_HEAD = ("controller.", "mask_head.")

pytestmark = pytest.mark.usefixtures("one_thread")


def doc_examples() -> list[tuple[str, list[str]]]:
    """``(command, shown output lines)`` for each ``$ tao weights`` line of the ``console`` blocks, in order."""
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S)
    out: list[tuple[str, list[str]]] = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("$ tao weights"):
                out.append((line[2:].strip(), []))
            elif out and line.strip() and not line.startswith("$"):
                out[-1][1].append(line.rstrip())
    return out


def doc_commands() -> list[str]:
    """The ``$ tao weights`` lines of the ``console`` blocks, in order."""
    return [cmd for cmd, _ in doc_examples()]


# ------------------------------------------------------------------------------------------------ stand-ins
def _mal_stand_ins(root: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).state_dict()
    mae = {k: v for k, v in vit.items() if not k.startswith("head.")}
    torch.save({"model": {**mae, "mask_token": torch.zeros(1, 1, 192)}}, root / "mae_pretrain_vit_base.pth")
    torch.save({"model": vit}, root / "deit_small_patch16_224-cd65a155.pth")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=gen) for k, s in json.loads(KEYS.read_text())["keys"]}
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("student.")}},
               root / "tao_mal_model.pth")
    torch.save({"state_dict": state, "tao_model": "mal", "epoch": 2, "global_step": 20}, root / "mal_model_latest.pth")
    for net in ("mask2former", "mask_grounding_dino"):
        torch.save({"state_dict": {"model.backbone.x": torch.zeros(2, 2)}, "tao_model": net, "epoch": 0},
                   root / f"{net}_model_latest.pth")


def _mask2former_stand_ins(root: Path):
    """The HF directory, the detectron2 ``.pkl`` of the same weights, and the two Swin releases; returns the HF
    model and config (the references)."""
    from safetensors.torch import save_file

    from tests.networks.backbones.test_swin_weights import _microsoft_names, _timm_swin
    from tests.networks.mask2former.test_hf_equivalence import _tiny_hf_model
    from tests.networks.mask2former.test_weight_formats import _detectron2_state_dict

    hf, cfg = _tiny_hf_model()
    hf.save_pretrained(root / M2F_HF)
    arrays = {k: v.detach().numpy() for k, v in _detectron2_state_dict(hf).items()}
    (root / "model_final_86143f.pkl").write_bytes(pickle.dumps(
        {"model": arrays, "__author__": "Facebook AI Research", "matching_heuristics": False}))
    swin = _timm_swin(window=7).state_dict()
    torch.save({"model": _microsoft_names(swin)}, root / "swin_tiny_patch4_window7_224.pth")
    timm_dir = root / "swin_tiny_patch4_window7_224.ms_in1k"  # what `huggingface-cli download timm/...` writes
    timm_dir.mkdir()
    save_file({k: v.contiguous() for k, v in swin.items()}, str(timm_dir / "model.safetensors"))
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "swin_tiny_patch4_window7_224",
                                                      "num_classes": 10, "pretrained_cfg": {"tag": "ms_in1k"}}))
    return hf, cfg


def _grounding_dino_stand_ins(root: Path):
    """The HF directory and the IDEA ``.pth`` of the same weights; returns the HF config."""
    from tests.networks.mask_grounding_dino.test_hf_equivalence import _ours, _tiny_hf
    from tests.networks.mask_grounding_dino.test_weight_formats import _idea_state_dict

    hf, cfg = _tiny_hf()
    hf.save_pretrained(root / "grounding-dino-tiny")
    torch.save({"model": _idea_state_dict(hf.state_dict(), _ours(cfg)), "optimizer": {}, "epoch": 11},
               root / "groundingdino_swint_ogc.pth")
    return cfg


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Stand-ins written to one directory, every documented command run there: ``(dir, references, {command:
    CliRunner result})``."""
    root = tmp_path_factory.mktemp("weights_doc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: built before the per-test one_thread fixture applies
    try:
        _mal_stand_ins(root)
        refs = {"mask2former": _mask2former_stand_ins(root), "grounding_dino": _grounding_dino_stand_ins(root)}
        runner = CliRunner()
        results = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            for cmd in doc_commands():
                results[cmd] = runner.invoke(app, shlex.split(cmd)[1:], prog_name="tao")
    finally:
        torch.set_num_threads(threads)
    return root, refs, results


#: what each documented command must print (lines of its output), by the file it names
EXPECT = {
    "mae_pretrain_vit_base.pth": ("format:      mae",),
    "deit_small_patch16_224-cd65a155.pth": ("format:      deit",),
    "tao_mal_model.pth": ("format:      tao",),
    "mal_model_latest.pth": ("tao_model:   mal",),
    "mask2former_model_latest.pth": ("network:     mask2former",),
    "mask_grounding_dino_model_latest.pth": ("network:     mask_grounding_dino",),
    "tao_mal_model.safetensors": ("format:      tao",),
    M2F_HF: ("network:     mask2former", "format:      hf", "part:        model"),
    "model_final_86143f.pkl": ("network:     mask2former", "format:      detectron2", "container:   detectron2-pkl"),
    "swin_tiny_patch4_window7_224.pth": ("format:      swin-microsoft", "part:        backbone"),
    "swin_tiny_patch4_window7_224.ms_in1k": ("format:      swin-timm", "container:   hf-dir"),
    "m2f.pth": ("network:     mask2former", "format:      ours", "tao_model:   mask2former"),
    "grounding-dino-tiny": ("network:     mask_grounding_dino", "format:      hf", "container:   hf-dir"),
    "groundingdino_swint_ogc.pth": ("network:     mask_grounding_dino", "format:      idea", "part:        model"),
    "gd.pth": ("network:     mask_grounding_dino", "format:      ours", "tao_model:   mask_grounding_dino"),
}


def test_doc_lists_the_runnable_commands():
    examples = doc_examples()
    assert len(examples) == 19
    assert {c.split()[2] for c, _ in examples} == {"inspect", "convert"}
    assert {c.split()[3] for c, _ in examples if c.split()[2] == "inspect"} == set(EXPECT)
    # the Mask2Former and Grounding DINO examples show what they print
    assert sum(bool(shown) for _, shown in examples) == 10


def test_doc_commands_run_on_tiny_stand_ins(ran):
    root, _, results = ran
    for cmd, shown in doc_examples():
        argv = shlex.split(cmd)[1:]
        result = results[cmd]
        assert result.exit_code == 0, (cmd, result.output)
        printed = result.output.splitlines()
        for line in shown:
            assert line in printed, (cmd, line, result.output)
        if argv[1] == "inspect":
            for line in EXPECT[argv[2]]:
                assert line in printed, (cmd, line, result.output)
        else:
            out = Path(argv[argv.index("--out") + 1])
            assert (root / out).is_file() and f"written:   {out}" in printed, (cmd, result.output)
    converted = torch.load(root / "mae_base_mal.pth", weights_only=True)
    assert converted["tao_model"] == "mal" and converted["converted_from"]["format"] == "mae"
    assert sum(k.startswith("student.backbone.") for k in converted["state_dict"]) == 150
    gd = results["tao weights convert mask_grounding_dino groundingdino_swint_ogc.pth --out gd.pth"].output
    assert "(4 known-unused dropped)" in gd  # label_enc, BERT pooler weight/bias, position_ids


def test_converted_mask2former_loads_like_the_hf_directory(ran):
    """``m2f.pth`` (``convert`` without ``-e``) loads through the export / evaluate loader into the model the HF
    config's sizes build, with every tensor equal to loading the HF directory itself, and gives HF's outputs."""
    from networks.mask2former.convert import hf_config_to_spec_overrides
    from networks.mask2former.export import load_model_weights
    from networks.mask2former.model import build_model
    from tests.networks.mask2former.test_weight_formats import _max_diff_to_hf

    root, refs, _ = ran
    hf, hf_cfg = refs["mask2former"]
    spec = hf_config_to_spec_overrides(hf_cfg)["model"]
    written = torch.load(root / "m2f.pth", weights_only=True)
    assert written["tao_model"] == "mask2former" and written["converted_from"] == {"path": M2F_HF, "format": "hf", "new_parts": []}

    torch.manual_seed(1)  # different inits: only loaded tensors can agree
    from_pth = build_model(spec)
    report = load_model_weights(from_pth, root / "m2f.pth", model_cfg=spec)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    torch.manual_seed(2)
    from_dir = build_model(spec)
    load_model_weights(from_dir, root / M2F_HF, model_cfg=spec)
    a, b = from_pth.state_dict(), from_dir.state_dict()
    assert a.keys() == b.keys() and len(a) == len(written["state_dict"]) == 253
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    worst = _max_diff_to_hf(hf, from_pth)  # asserts <= 1e-4 over every decoder layer's logits and masks
    print(f"m2f.pth vs HF Mask2Former: max |diff| = {worst:.2e}")


def _gdino_model(refs, seed: int):
    from tests.networks.mask_grounding_dino.test_hf_equivalence import _ours

    torch.manual_seed(seed)
    return _ours(refs["grounding_dino"])


def test_converted_grounding_dino_holds_the_idea_tensors(ran):
    """``gd.pth`` holds, under ``model.<key>``, exactly the tensors loading the IDEA file gives: every model tensor
    but the mask head IDEA's file does not have."""
    from networks.mask_grounding_dino.export import load_model_weights

    root, refs, _ = ran
    model = _gdino_model(refs, 3)
    report = load_model_weights(model, root / "groundingdino_swint_ogc.pth")
    mask_head = sorted(k for k in model.state_dict() if k.startswith(GDINO_MASK_HEAD))
    assert sorted(report.missing) == mask_head and len(mask_head) == 16
    written = torch.load(root / "gd.pth", weights_only=True)
    assert written["tao_model"] == "mask_grounding_dino"
    assert written["converted_from"] == {"path": "groundingdino_swint_ogc.pth", "format": "idea",
                                        "new_parts": ["controller.*", "mask_head.*", "rela.*"]}
    assert all(k.startswith("model.") for k in written["state_dict"])
    got = {k[len("model."):]: v for k, v in written["state_dict"].items()}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(GDINO_MASK_HEAD)}
    assert got.keys() == expected.keys() and len(got) == 374
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


def test_converted_grounding_dino_loads_as_pretrained_model(ran):
    from networks.mask_grounding_dino.module import load_full_weights

    root, refs, _ = ran
    model = _gdino_model(refs, 4)
    report = load_full_weights(model, root / "gd.pth")  # the train.pretrained_model_path loader
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith(GDINO_MASK_HEAD))
    reference = _gdino_model(refs, 5)
    load_full_weights(reference, root / "groundingdino_swint_ogc.pth")
    a, b = model.state_dict(), reference.state_dict()
    assert [k for k in a if not k.startswith(GDINO_MASK_HEAD) and not torch.equal(a[k], b[k])] == []
