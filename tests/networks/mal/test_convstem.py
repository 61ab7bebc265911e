"""ConvStem MAL checkpoints (TAO 5.0-6.0, NVlabs MAL) with ``model.patch_embed: convstem``.

The key fixture ``data/tao5_mal_tiny_keys.json`` is written by :func:`orig_mal_keys`, which restates the module
structure of NVlabs/mask-auto-labeler ``models/mal.py`` + ``models/vision_transformers.py`` (identical in TAO 5.x
``cv/mal/models/mal.py`` + ``cv/backbone/vision_transformer.py``) from those files, not from our model.  The
numerical references below are likewise written from ORIG's forward (ConvStem stages, ``prepare_tokens``,
``Block``/``Attention`` math), independent of timm.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[3]
KEYS = Path(__file__).parent / "data" / "tao5_mal_tiny_keys.json"


# ------------------------------------------------------------------------------------------ the generator
def orig_mal_keys(*, embed_dim: int, depth: int, mask_head_num_convs: int, hidden: int, out: int,
                  img_size: int = 224, patch: int = 16, stem_depth: int = 4) -> list[list]:
    """``[[key, shape], ...]`` of ORIG's ``MAL`` state dict (student then teacher), from its module structure.

    Backbone (``VisionTransformer``): own parameters ``cls_token [1,1,D]``, ``pos_embed [1,(img/patch)^2+1,D]``;
    ``patch_embed = ConvStem``: stage i = ``Sequential(Conv2d(cin, cout, 3, s2, bias=False), GroupNorm(1, cout),
    GELU)`` with cout = D/2^(stem_depth-1-i), the last stage adds ``Conv2d(D, D, 1)`` (bias) at index 3, ``norm`` =
    Identity; ``blocks[i]`` = norm1, attn.qkv (bias), attn.proj, norm2, mlp.fc1 (4D), mlp.fc2; final ``norm``;
    ``head`` = Identity.  Heads: ``roi_head.mlp1/mlp2`` (Linear), ``mask_head.convs[i].conv`` (3x3, bias).
    """
    d = embed_dim
    bb: list[list] = [["cls_token", [1, 1, d]], ["pos_embed", [1, (img_size // patch) ** 2 + 1, d]]]
    cin, cout = 3, d // 2 ** (stem_depth - 1)
    for i in range(stem_depth):
        bb += [[f"patch_embed.proj.{i}.0.weight", [cout, cin, 3, 3]],
               [f"patch_embed.proj.{i}.1.weight", [cout]], [f"patch_embed.proj.{i}.1.bias", [cout]]]
        if i == stem_depth - 1:
            bb += [[f"patch_embed.proj.{i}.3.weight", [d, cout, 1, 1]], [f"patch_embed.proj.{i}.3.bias", [d]]]
        cin, cout = cout, cout * 2
    for b in range(depth):
        p = f"blocks.{b}."
        bb += [[p + "norm1.weight", [d]], [p + "norm1.bias", [d]],
               [p + "attn.qkv.weight", [3 * d, d]], [p + "attn.qkv.bias", [3 * d]],
               [p + "attn.proj.weight", [d, d]], [p + "attn.proj.bias", [d]],
               [p + "norm2.weight", [d]], [p + "norm2.bias", [d]],
               [p + "mlp.fc1.weight", [4 * d, d]], [p + "mlp.fc1.bias", [4 * d]],
               [p + "mlp.fc2.weight", [d, 4 * d]], [p + "mlp.fc2.bias", [d]]]
    bb += [["norm.weight", [d]], ["norm.bias", [d]]]
    heads = [["roi_head.mlp1.weight", [out, d]], ["roi_head.mlp1.bias", [out]],
             ["roi_head.mlp2.weight", [out, out]], ["roi_head.mlp2.bias", [out]]]
    for i in range(mask_head_num_convs):
        cin = d if i == 0 else hidden
        co = hidden if i < mask_head_num_convs - 1 else out
        heads += [[f"mask_head.convs.{i}.conv.weight", [co, cin, 3, 3]], [f"mask_head.convs.{i}.conv.bias", [co]]]
    net = [["backbone." + k, s] for k, s in bb] + heads
    return [[f"{who}.{k}", s] for who in ("student", "teacher") for k, s in net]


# ------------------------------------------------------------------------------- ORIG forward references
def _orig_stem(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str = "", depth: int = 4) -> torch.Tensor:
    """ORIG ``ConvStem.forward``: [B,3,H,W] -> tokens [B, H/16*W/16, D]."""
    for i in range(depth):
        p = f"{prefix}proj.{i}."
        x = F.conv2d(x, sd[p + "0.weight"], stride=2, padding=1)
        x = F.group_norm(x, 1, sd[p + "1.weight"], sd[p + "1.bias"], eps=1e-6)
        x = F.gelu(x)
        if i == depth - 1:
            x = F.conv2d(x, sd[p + "3.weight"], sd[p + "3.bias"])
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(2, 1)


def _orig_backbone(x: torch.Tensor, sd: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """ORIG ``base_forward`` + ``get_spatial_feat`` at the pos-embed's own grid: [B,3,H,W] -> [B,D,H/16,W/16]."""
    b, _, h, w = x.shape
    t = _orig_stem(x, sd, "patch_embed.")
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1)
    assert t.shape[1] == sd["pos_embed"].shape[1]  # no interpolation at the checkpoint's own grid
    t = t + sd["pos_embed"]
    d = t.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, d)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + y
        i += 1
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    n = int(math.sqrt(t.shape[1] - 1))
    return t[:, 1:].transpose(2, 1).reshape(b, d, n, n)


# ----------------------------------------------------------------------------------------------- helpers
def _cfg(patch_embed: str | None = "convstem", **train):
    import networks.mal as mal

    cfg = OmegaConf.merge(OmegaConf.structured(mal.ExperimentConfig), OmegaConf.load(REPO / "configs/mal/tiny.yaml"))
    if patch_embed is not None:
        cfg.model.patch_embed = patch_embed
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def _module(cfg, action="evaluate", tmp=Path("/nonexistent")):
    import networks.mal as mal
    from networks.common.context import RunContext

    return mal.build_module(cfg, RunContext(action=action, run_dir=tmp))


def _tao5_state(seed=0, student_only=False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = json.loads(KEYS.read_text())["keys"]
    state = {k: torch.randn(*s, generator=gen) * 0.05 for k, s in rows}
    for k in state:  # GroupNorm/LayerNorm scales near 1, as trained weights are
        if k.endswith(("1.weight", "norm1.weight", "norm2.weight", "norm.weight")) and state[k].ndim == 1:
            state[k] = state[k] + 1.0
    return {k: v for k, v in state.items() if k.startswith("student.")} if student_only else state


def _outputs(module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0], [0.0, 0.0, 200.0, 200.0]])
    module.eval()
    with torch.no_grad():
        return {"student": module.student(x, boxes), "teacher": module.teacher(x, boxes)}


# ------------------------------------------------------------------------------------------------- tests
def test_fixture_matches_the_generator_and_our_convstem_module():
    doc = json.loads(KEYS.read_text())
    rows = doc["keys"]
    assert rows == orig_mal_keys(embed_dim=192, depth=12, mask_head_num_convs=4, hidden=256, out=256)
    assert len(rows) == doc["count"] == 2 * (2 + 14 + 12 * 12 + 2 + 4 + 8) == 348
    own = {k: list(v.shape) for k, v in _module(_cfg()).state_dict().items()}
    assert {k: s for k, s in rows} == own


def test_convstem_embed_matches_orig_stem_and_has_stride_16():
    from networks.backbones.vit import ConvStemPatchEmbed

    torch.manual_seed(0)
    stem = ConvStemPatchEmbed(224, 16, 3, 192, output_fmt="NHWC").eval()
    sd = stem.state_dict()
    prefix = "student.backbone.patch_embed."
    assert {k: list(v.shape) for k, v in sd.items()} == {k[len(prefix):]: s for k, s in orig_mal_keys(
        embed_dim=192, depth=1, mask_head_num_convs=1, hidden=1, out=1) if k.startswith(prefix)}
    assert [tuple(sd[f"proj.{i}.0.weight"].shape[:2]) for i in range(4)] == [(24, 3), (48, 24), (96, 48), (192, 96)]
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = stem(x)
        ref = _orig_stem(x, sd)
    assert y.shape == (2, 4, 6, 192) and stem.feat_ratio() == 16 and stem.dynamic_feat_size((64, 96)) == (4, 6)
    assert (y.flatten(1, 2) - ref).abs().max().item() <= 1e-5


def test_convstem_backbone_forward_equals_orig_at_its_grid():
    from networks.backbones.vit import build_vit

    vit = build_vit("vit-deit-tiny/16", patch_embed="convstem", weight_init="skip").eval()
    assert vit.patch_size == 16 and "head.weight" not in vit.state_dict()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] < 1000 else 0))
    sd = vit.state_dict()
    x = torch.randn(1, 3, 224, 224, generator=gen)
    with torch.no_grad():
        out = vit(x)
        ref = _orig_backbone(x, sd, heads=3)
    assert out.shape == (1, 192, 14, 14)
    assert (out - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # any multiple of 16 works: [B,3,H,W] -> [B,C,H/16,W/16]
        assert vit(torch.zeros(2, 3, 64, 96)).shape == (2, 192, 4, 6)


@pytest.mark.parametrize("tagged", [False, True])
def test_convstem_checkpoint_loads_as_evaluate_checkpoint_exactly(tmp_path, tagged, caplog):
    from tao_cli.engine.actions import load_into

    state = _tao5_state()
    f = tmp_path / "tao5_mal.pth"
    obj = {"state_dict": state, "epoch": 3, "optimizer_states": [], "hyper_parameters": {}}
    if tagged:
        obj["tao_model"] = "mal"  # TAO's on_save_checkpoint tag
    torch.save(obj, f)
    mod = _module(_cfg())
    log = logging.getLogger("test-convstem")
    with caplog.at_level(logging.INFO, logger="test-convstem"):
        meta = load_into(mod, f, None, "mal", model_cfg=_cfg().model, field="evaluate.checkpoint", log=log)
    assert meta.get("epoch") == 3
    sd = mod.state_dict()
    assert set(sd) == set(state) and all(torch.equal(sd[k], state[k]) for k in state)
    ref = _module(_cfg())
    ref.load_state_dict(state, strict=True)  # the same tensors under our names
    a, b = _outputs(ref), _outputs(mod)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6
    assert not torch.equal(a["student"], a["teacher"])


def test_student_only_convstem_file_reports_zero_missing_and_fills_teacher(tmp_path, caplog):
    from tao_cli.engine.actions import load_into

    state = _tao5_state(student_only=True)
    f = tmp_path / "nvlabs_student.pth"
    torch.save({"state_dict": state}, f)
    mod = _module(_cfg())
    log = logging.getLogger("test-convstem")
    with caplog.at_level(logging.INFO, logger="test-convstem"):
        load_into(mod, f, None, "mal", model_cfg=_cfg().model, field="evaluate.checkpoint", log=log)
    line = next(r.getMessage() for r in caplog.records if "format 'convstem'" in r.getMessage())
    assert "348 matched, 0 newly initialised, 0 unexpected, 0 shape-mismatched" in line
    sd = mod.state_dict()
    for k, v in state.items():
        assert torch.equal(sd[k], v) and torch.equal(sd["teacher." + k[len("student."):]], v)


def test_convstem_file_as_pretrained_model_path_gives_student_to_both(tmp_path):
    state = _tao5_state()
    f = tmp_path / "tao5_mal.pth"
    torch.save({"state_dict": state, "tao_model": "mal"}, f)
    mod = _module(_cfg(pretrained_model_path=str(f)), action="train")
    sd = mod.state_dict()
    n = 0
    for k, v in state.items():
        if k.startswith("student."):
            assert torch.equal(sd[k], v) and torch.equal(sd["teacher." + k[len("student."):]], v)
            n += 1
    assert n == 174 and len(sd) == 348
    ref = _module(_cfg())
    ref.load_state_dict({**{k: v for k, v in state.items() if k.startswith("student.")},
                         **{"teacher." + k[8:]: v for k, v in state.items() if k.startswith("student.")}})
    a, b = _outputs(ref), _outputs(mod)
    assert all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in a)


@pytest.mark.parametrize("route", ["evaluate", "evaluate-tagged", "pretrained", "convert"])
def test_linear_spec_with_convstem_file_is_one_line_naming_the_field(tmp_path, route):
    """Also a TAO 5 checkpoint that carries TAO's ``tao_model: mal`` tag: the engine must not treat it as a plain
    model mismatch but let the ConvStem format name the field to set."""
    from networks.common.errors import CheckpointError
    from tao_cli.engine.actions import load_into

    f = tmp_path / "nvlabs_mal.pth"
    torch.save({"state_dict": _tao5_state(), **({"tao_model": "mal"} if route.endswith("tagged") else {})}, f)
    with pytest.raises(CheckpointError) as err:
        if route.startswith("evaluate"):
            load_into(_module(_cfg(None)), f, None, "mal", model_cfg=_cfg(None).model, field="evaluate.checkpoint")
        elif route == "pretrained":
            _module(_cfg(None, pretrained_model_path=str(f)), action="train")
        else:
            from networks.common.weight_formats import read_source
            from networks.mal.weight_formats import weight_formats

            fmt = next(x for x in weight_formats() if x.name == "convstem")
            fmt.to_state_dict(read_source(f), _cfg(None).model)
    line = err.value.one_line()
    assert "model.patch_embed=convstem" in line and "ConvStem" in line and "\n" not in line


@pytest.mark.parametrize("route", ["pretrained", "evaluate", "mae"])
def test_convstem_spec_with_linear_file_names_the_field(tmp_path, route):
    from networks.common.errors import CheckpointError
    from tao_cli.engine.actions import load_into

    linear = _module(_cfg(None)).state_dict()
    f = tmp_path / "linear.pth"
    with pytest.raises(CheckpointError) as err:
        if route == "pretrained":  # a TAO 6.25.7+ checkpoint as train.pretrained_model_path
            torch.save({"state_dict": linear, "tao_model": "mal"}, f)
            _module(_cfg(pretrained_model_path=str(f)), action="train")
        elif route == "evaluate":  # untagged student-only TAO 6.25.7+ file: the 'tao' format path
            torch.save({"state_dict": {k: v for k, v in linear.items() if k.startswith("student.")}}, f)
            load_into(_module(_cfg()), f, None, "mal", model_cfg=_cfg().model, field="evaluate.checkpoint")
        else:  # an MAE backbone through the format converter
            from networks.common.weight_formats import detect_format, read_source
            from networks.mal.weight_formats import weight_formats

            prefix = "student.backbone."
            torch.save({"model": {k[len(prefix):]: v for k, v in linear.items()
                                  if k.startswith(prefix) and ".head." not in k}}, f)
            src = read_source(f)
            detect_format(src, weight_formats()).to_state_dict(src, _cfg().model)
    line = err.value.one_line()
    assert "model.patch_embed=linear" in line and "\n" not in line


def test_patch_embed_field_is_validated():
    from networks.backbones.vit import build_vit
    from networks.common.errors import ConfigError

    with pytest.raises(ConfigError, match="model.patch_embed"):
        build_vit("vit-deit-tiny/16", patch_embed="conv")
