"""MAL weight formats: TAO/tao-cli Lightning checkpoints (student/teacher), ConvStem vs the default spec,
MAE/DeiT/timm ViT.

The TAO layout comes from a checked-in key list (``data/tao_mal_tiny_keys.json``, written from TAO's module
structure for ``configs/mal/tiny.yaml``); a state dict with exactly those names loads through the engine's
``evaluate.checkpoint`` path and as ``train.pretrained_model_path`` with nothing missing or unexpected, and gives
the same outputs as our own checkpoint of the same weights.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[3]
KEYS = Path(__file__).parent / "data" / "tao_mal_tiny_keys.json"


def _cfg(**train):
    import networks.mal as mal

    cfg = OmegaConf.merge(OmegaConf.structured(mal.ExperimentConfig), OmegaConf.load(REPO / "configs/mal/tiny.yaml"))
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def _module(cfg, action="evaluate", tmp=Path("/nonexistent")):
    import networks.mal as mal
    from networks.common.context import RunContext

    return mal.build_module(cfg, RunContext(action=action, run_dir=tmp))


def _tao_state(seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under TAO's exact key names and shapes (student and teacher differ)."""
    gen = torch.Generator().manual_seed(seed)
    rows = json.loads(KEYS.read_text())["keys"]
    return {k: torch.randn(*shape, generator=gen) * 0.05 for k, shape in rows}


def _outputs(module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0], [0.0, 0.0, 200.0, 200.0]])
    module.eval()
    with torch.no_grad():
        return {"student": module.student(x, boxes), "teacher": module.teacher(x, boxes)}


def test_key_fixture_is_our_module_layout():
    rows = json.loads(KEYS.read_text())["keys"]
    assert len(rows) == 328 == json.loads(KEYS.read_text())["count"]
    own = {k: list(v.shape) for k, v in _module(_cfg()).state_dict().items()}
    assert {k: s for k, s in rows} == own


@pytest.mark.parametrize("tagged", [False, True])
def test_tao_checkpoint_loads_as_evaluate_checkpoint_like_our_own(tmp_path, tagged, caplog):
    from tao_cli.engine.actions import load_into

    state = _tao_state()
    tao_file = tmp_path / "tao_mal.pth"
    obj = {"state_dict": state, "epoch": 7, "global_step": 70, "optimizer_states": []}
    if tagged:
        obj["tao_model"] = "mal"
    else:  # a re-saved TAO file without the tag: exactly our layout, so it loads as our own checkpoint does
        obj = {"state_dict": state, "epoch": 7}
    torch.save(obj, tao_file)
    ours = tmp_path / "ours.pth"
    torch.save({"state_dict": state, "tao_model": "mal", "epoch": 7}, ours)

    ref = _module(_cfg())
    load_into(ref, ours, None, "mal")
    mod = _module(_cfg())
    log = logging.getLogger("test-mal-weights")
    with caplog.at_level(logging.INFO, logger="test-mal-weights"):
        meta = load_into(mod, tao_file, None, "mal", model_cfg=_cfg().model, field="evaluate.checkpoint", log=log)
    assert meta.get("epoch") == 7
    for name, sd in (("ref", ref.state_dict()), ("mod", mod.state_dict())):
        assert all(torch.equal(sd[k], state[k]) for k in state), name
    a, b = _outputs(ref), _outputs(mod)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6
    assert not torch.equal(a["student"], a["teacher"])  # the teacher came from the file, not from the student


def test_untagged_tao_layout_goes_through_the_format_and_reports_counts(tmp_path, caplog):
    """Untagged with one extra key (a TAO buffer we do not have): not our exact layout, so the format path runs
    and refuses the unknown key; without it the file loads exactly (own-layout path)."""
    from networks.common.errors import CheckpointError
    from tao_cli.engine.actions import load_into

    state = _tao_state()
    state["mean_field.unknown"] = torch.zeros(1)
    f = tmp_path / "tao_extra.pth"
    torch.save({"state_dict": state}, f)
    with pytest.raises(CheckpointError, match=r"\(tao\) does not fit the model.*mean_field.unknown"):
        load_into(_module(_cfg()), f, None, "mal", field="evaluate.checkpoint")


def test_student_only_file_fills_teacher_and_logs_counts(tmp_path, caplog):
    from tao_cli.engine.actions import load_into

    state = {k: v for k, v in _tao_state().items() if k.startswith("student.")}
    f = tmp_path / "student_only.pth"
    torch.save({"state_dict": state}, f)
    mod = _module(_cfg())
    log = logging.getLogger("test-mal-weights")
    with caplog.at_level(logging.INFO, logger="test-mal-weights"):
        load_into(mod, f, None, "mal", field="evaluate.checkpoint", log=log)
    sd = mod.state_dict()
    for k, v in state.items():
        assert torch.equal(sd[k], v) and torch.equal(sd["teacher." + k[len("student."):]], v)
    line = next(r.getMessage() for r in caplog.records if "format 'tao'" in r.getMessage())
    assert "328 matched, 0 newly initialised, 0 unexpected, 0 shape-mismatched" in line


def test_tao_checkpoint_as_pretrained_model_path_gives_student_to_both(tmp_path):
    state = _tao_state()
    f = tmp_path / "tao_mal.pth"
    torch.save({"state_dict": state, "tao_model": "mal"}, f)
    mod = _module(_cfg(pretrained_model_path=str(f)), action="train")
    sd = mod.state_dict()
    for k, v in state.items():
        if k.startswith("student."):
            assert torch.equal(sd[k], v)
            assert torch.equal(sd["teacher." + k[len("student."):]], v)  # TAO: student weights into both


def test_convstem_checkpoint_with_the_default_spec_is_refused_naming_the_field(tmp_path):
    """ConvStem files load with model.patch_embed=convstem (tests/networks/mal/test_convstem.py); with the default
    'linear' the format says which field to set, in one line."""
    from networks.common.errors import CheckpointError
    from networks.common.weight_formats import detect_format, read_source
    from networks.mal.weight_formats import weight_formats
    from tao_cli.engine.actions import load_into

    state = {k: v for k, v in _tao_state().items() if "patch_embed.proj" not in k}
    state["student.backbone.patch_embed.proj.0.0.weight"] = torch.zeros(24, 3, 3, 3)
    f = tmp_path / "nvlabs_mal.pth"
    torch.save({"state_dict": state}, f)
    assert detect_format(read_source(f), weight_formats()).name == "convstem"
    with pytest.raises(CheckpointError) as err:
        load_into(_module(_cfg()), f, None, "mal", model_cfg=_cfg().model, field="evaluate.checkpoint")
    line = err.value.one_line()
    assert "ConvStem" in line and "set model.patch_embed=convstem" in line and "\n" not in line


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                             dynamic_img_size=True).eval()


@pytest.mark.parametrize("layout,expected", [("mae", "mae"), ("deit", "deit"), ("deit-distilled", "deit"),
                                             ("timm", "timm-vit")])
def test_vit_backbone_formats_detect_and_convert_to_equal_features(tmp_path, layout, expected):
    from networks.common.weight_formats import detect_format, read_source
    from networks.mal.weight_formats import weight_formats
    from tao_cli.weights_cmd import convert

    vit = _timm_vit()
    sd = vit.state_dict()
    if layout == "mae":
        obj = {"model": {**{k: v for k, v in sd.items() if not k.startswith("head.")},
                         "mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, 192)}}
    elif layout == "deit":
        obj = {"model": sd}
    elif layout == "deit-distilled":
        pos = sd["pos_embed"]
        obj = {"model": {**sd, "dist_token": torch.zeros(1, 1, 192), "head_dist.weight": torch.zeros(1000, 192),
                         "pos_embed": torch.cat([pos[:, :1], torch.zeros(1, 1, 192), pos[:, 1:]], 1)}}
    else:
        obj = sd
    f = tmp_path / f"{layout}.pth"
    torch.save(obj, f)
    assert detect_format(read_source(f), weight_formats()).name == expected
    out = tmp_path / f"{layout}_mal.pth"
    lines = convert("mal", f, out, spec=REPO / "configs/mal/tiny.yaml")
    assert any("newly initialised" in line for line in lines)
    mod = _module(_cfg(pretrained_model_path=str(out)), action="train")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vit.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 192, 4, 4)
        for net in (mod.student, mod.teacher):
            diff = (net.backbone.eval()(x) - ref).abs().max().item()
            assert diff <= 1e-4


def test_timm_hub_directory_as_pretrained_model_path(tmp_path):
    """A Hugging Face download of a timm ViT (config.json + model.safetensors, no classifier) is a directory."""
    from safetensors.torch import save_file

    vit = _timm_vit()
    d = tmp_path / "vit_tiny_mae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 0}))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")},
              str(d / "model.safetensors"))
    mod = _module(_cfg(pretrained_model_path=str(d)), action="train")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = vit.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 192, 4, 4)
        assert (mod.teacher.backbone.eval()(x) - ref).abs().max().item() <= 1e-4
