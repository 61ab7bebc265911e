"""Mask2Former weight formats, proved on random-initialised reference models (offline).

* ``hf``: a tiny ``Mask2FormerForUniversalSegmentation`` written by ``save_pretrained`` (safetensors, transformers-5
  writes its original key layout) and as ``pytorch_model.bin`` (the in-memory layout), loaded through the train
  path (``train.pretrained_model_path`` in :class:`Mask2FormerModule`) and through read_source + detect_format +
  load_converted (the engine's path) → every class and mask logit equals HF's within 1e-4.
* ``detectron2``: the same HF weights renamed to detectron2 names (reference notes §10.2 = HF's conversion table;
  class axis back to no-object-last) pickled as a model-zoo ``.pkl`` of numpy arrays → same outputs.
* ``tao``: the key list of TAO's Lightning checkpoint for the tiny spec (data/tao_keys_tiny.json, written by
  :func:`write_tao_fixture` from :func:`networks.mask2former.weight_formats.tao_checkpoint_layout`) loads with zero
  missing and zero unexpected keys.
* A short fine-tune from HF weights trained on the synthetic set starts below the random-init loss.

Regenerate the fixture: ``.venv/bin/python tests/networks/mask2former/test_weight_formats.py``.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from networks.common.context import RunContext  # noqa: E402
from networks.common.errors import CheckpointError  # noqa: E402
from networks.common.weight_formats import detect_format, load_converted, read_source  # noqa: E402
from networks.mask2former.convert import hf_config_to_spec_overrides, hf_to_tao_state_dict  # noqa: E402
from networks.mask2former.weight_formats import formats, tao_checkpoint_layout  # noqa: E402
from tests.inspect_check import assert_inspect_names  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
TAO_FIXTURE = DATA / "tao_keys_tiny.json"
REPO = Path(__file__).resolve().parents[3]
NUM_LABELS = 5
CLASS_KEYS = ("sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias")


def _tiny_spec_model():
    from networks.mask2former.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(REPO / "configs/mask2former/tiny.yaml"))
    return cfg.model


def write_tao_fixture(path: Path = TAO_FIXTURE) -> dict:
    """Write ``{key: shape}`` of a TAO-trained checkpoint for configs/mask2former/tiny.yaml (TAO's module
    structure, see ``tao_checkpoint_layout``), sorted keys, to ``path``; returns it."""
    layout = tao_checkpoint_layout(_tiny_spec_model())
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"  {json.dumps(k)}: {json.dumps(layout[k])}" for k in sorted(layout)]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one key per line: readable diffs
    return layout


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from .test_hf_equivalence import _tiny_hf_model

    return _tiny_hf_model()


def _spec_for(m2f_synthetic, hf_cfg, tmp_path, **train):
    from .conftest import make_tiny_cfg

    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.model = OmegaConf.merge(cfg.model, hf_config_to_spec_overrides(hf_cfg)["model"])
    cfg.results_dir = str(tmp_path)
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def _train_module(cfg, tmp_path):
    from networks.mask2former.module import Mask2FormerModule

    torch.manual_seed(123)  # a different init than HF's: only loaded weights can make the outputs agree
    return Mask2FormerModule(cfg, RunContext(action="train", run_dir=tmp_path))


def _max_diff_to_hf(hf, ours) -> float:
    """Max |Δ| over every prediction (4 decoder outputs): class logits (rolled) and mask logits; asserts ≤ 1e-4."""
    ours.eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 256, 288)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        out = ours(x)
    ref_cls = [a["class_queries_logits"] for a in ref.auxiliary_logits] + [ref.class_queries_logits]
    ref_msk = [a["masks_queries_logits"] for a in ref.auxiliary_logits] + [ref.masks_queries_logits]
    our_cls = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
    our_msk = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    assert len(our_cls) == len(ref_cls) == 4
    worst = 0.0
    for a, b, m, n in zip(our_cls, ref_cls, our_msk, ref_msk, strict=True):
        b = torch.cat([b[..., -1:], b[..., :-1]], dim=-1)  # HF no-object last → column 0 here
        worst = max(worst, (a - b).abs().max().item(), (m - n).abs().max().item())
    assert worst <= 1e-4, worst
    return worst


def _save_hf(hf, cfg, directory: Path, kind: str) -> Path:
    directory.mkdir()
    if kind == "safetensors":
        hf.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
    else:
        cfg.save_pretrained(directory)
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    return directory


# --------------------------------------------------------------------------------------------------- hf
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_directory_through_train_and_engine_paths(tmp_path, m2f_synthetic, hf_model, kind):
    hf, hf_cfg = hf_model
    path = _save_hf(hf, hf_cfg, tmp_path / f"hf_{kind}", kind)
    cfg = _spec_for(m2f_synthetic, hf_cfg, tmp_path, pretrained_model_path=str(path))
    module = _train_module(cfg, tmp_path)  # train: loads train.pretrained_model_path
    _max_diff_to_hf(hf, module.model)

    src = read_source(path)
    fmt = detect_format(src, formats())
    assert (src.container, fmt.name) == ("hf-dir", "hf")
    assert_inspect_names(path, "mask2former", "hf")
    from networks.mask2former.model import build_model

    torch.manual_seed(7)
    model = build_model(cfg.model)
    report = load_converted(model, src, fmt, cfg.model)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    _max_diff_to_hf(hf, model)

    # what `export` and the engine's evaluate/inference load with (export.checkpoint / evaluate.checkpoint)
    from networks.mask2former.export import load_model_weights
    from tao_cli.engine.actions import load_into

    torch.manual_seed(8)
    model = build_model(cfg.model)
    load_model_weights(model, path, model_cfg=cfg.model)
    _max_diff_to_hf(hf, model)
    from networks.mask2former.module import Mask2FormerModule

    torch.manual_seed(9)
    module = Mask2FormerModule(cfg, RunContext(action="evaluate", run_dir=tmp_path / "engine"))
    load_into(module, path, None, "mask2former", model_cfg=cfg.model, field="evaluate.checkpoint")
    _max_diff_to_hf(hf, module.model)


def test_hf_config_is_checked_against_the_spec(tmp_path, m2f_synthetic, hf_model, caplog):
    hf, hf_cfg = hf_model
    path = _save_hf(hf, hf_cfg, tmp_path / "hf", "safetensors")
    cfg = _spec_for(m2f_synthetic, hf_cfg, tmp_path)
    from networks.mask2former.model import build_model
    from networks.mask2former.module import load_pretrained_model

    bad = cfg.model.copy()
    bad.backbone.swin.window_size = 4
    with pytest.raises(CheckpointError, match=r"window_size=7 but the spec has model.backbone.swin.window_size=4"):
        load_pretrained_model(build_model(bad), path, bad)
    other = cfg.model.copy()
    other.sem_seg_head.num_classes = 3
    with caplog.at_level("INFO"):
        report = load_pretrained_model(build_model(other), path, other)
    assert {m[0] for m in report.mismatched} == set(CLASS_KEYS)
    assert "num_classes=5, the spec model.sem_seg_head.num_classes=3" in caplog.text


# ------------------------------------------------------------------------------------------- detectron2
def _detectron2_state_dict(hf) -> dict:
    """HF → detectron2 (facebookresearch/Mask2Former) names: the reference notes' §10.2 table (HF's own conversion
    table, implemented by ``hf_to_tao_state_dict``), with the class axis back in detectron2 order (no-object last)
    and the criterion buffer the model-zoo files carry."""
    sd = hf_to_tao_state_dict(hf.state_dict(), NUM_LABELS)
    for k in CLASS_KEYS:
        sd[k] = torch.roll(sd[k], shifts=-1, dims=0)
    sd["criterion.empty_weight"] = torch.ones(NUM_LABELS + 1)
    return sd


def test_detectron2_pkl_through_the_train_path(tmp_path, m2f_synthetic, hf_model):
    hf, hf_cfg = hf_model
    arrays = {k: v.detach().numpy() for k, v in _detectron2_state_dict(hf).items()}
    path = tmp_path / "model_final_abc.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "Facebook AI Research",
                                   "matching_heuristics": False}))
    assert detect_format(read_source(path), formats()).name == "detectron2"
    assert_inspect_names(path, "mask2former", "detectron2")
    cfg = _spec_for(m2f_synthetic, hf_cfg, tmp_path, pretrained_model_path=str(path))
    _max_diff_to_hf(hf, _train_module(cfg, tmp_path).model)


# ------------------------------------------------------------------------------------------------- tao
def test_tao_key_fixture_loads_with_nothing_missing_or_unexpected(tmp_path):
    from networks.mask2former.model import build_model
    from networks.mask2former.module import load_pretrained_model

    fixture = json.loads(TAO_FIXTURE.read_text())
    spec = _tiny_spec_model()
    assert fixture == tao_checkpoint_layout(spec), "fixture is stale: regenerate it (module docstring)"
    model = build_model(spec)
    assert len(fixture) == len(model.state_dict()) + 1 == 164  # + criterion.empty_weight
    torch.manual_seed(0)
    state = {k: (torch.zeros(s, dtype=torch.long) if k.endswith("relative_position_index") else torch.randn(s))
             for k, s in fixture.items()}
    for key in [k for k in state if k.endswith("relative_position_index")]:
        state[key] = model.state_dict()[key[len("model."):]].clone()
    path = tmp_path / "model_epoch_049_step_01000.pth"
    torch.save({"state_dict": state, "epoch": 49, "pytorch-lightning_version": "2.1.0"}, path)
    assert detect_format(read_source(path), formats()).name == "tao"
    assert_inspect_names(path, "mask2former", "tao")
    report = load_pretrained_model(model, path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.loaded == 163 and report.benign == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model." + k]), k
    torch.save({"state_dict": state, "tao_model": "mask2former"}, path)
    assert detect_format(read_source(path), formats()).name == "ours"
    torch.save({"state_dict": state, "tao_model": "mal"}, path)
    with pytest.raises(CheckpointError, match="'mal' checkpoint"):
        load_pretrained_model(model, path)


# ------------------------------------------------------------------------------------------ backbone
def test_swin_backbone_release_through_both_train_fields(tmp_path, m2f_synthetic):
    """A backbone-only file works as model.backbone.pretrained_weights and as train.pretrained_model_path (then
    the head is reported as newly initialised); a tagged backbone-only file (``tao weights convert`` of a release)
    is still a Swin format."""
    from networks.mask2former.model import build_model
    from networks.mask2former.module import load_pretrained_model

    from .conftest import make_tiny_cfg

    cfg = make_tiny_cfg(m2f_synthetic)
    torch.manual_seed(3)
    src = build_model(cfg.model).backbone
    release = {k: v for k, v in src.state_dict().items() if not k.startswith("norm")}
    release["head.weight"] = torch.zeros(10, 256)
    path = tmp_path / "swin_release.pth"
    torch.save({"model": release}, path)
    cfg.model.backbone.pretrained_weights = str(path)
    module = _train_module(cfg, tmp_path)
    for k, v in release.items():
        if not k.startswith("head"):
            assert torch.equal(module.model.backbone.state_dict()[k], v), k

    model = build_model(cfg.model)
    report = load_pretrained_model(model, path, cfg.model)
    n_head = sum(1 for k in model.state_dict() if k.startswith("sem_seg_head."))
    assert report.loaded == len(release) - 1 and report.unexpected == [] and report.mismatched == []
    assert len(report.missing) == n_head + 8  # the head and norm0..3 (weight, bias)
    tagged = tmp_path / "converted.pth"
    torch.save({"state_dict": {"model.backbone." + k: v for k, v in release.items() if not k.startswith("head")},
                "tao_model": "mask2former"}, tagged)
    assert detect_format(read_source(tagged), formats()).name == "swin-microsoft"
    assert load_pretrained_model(build_model(cfg.model), tagged, cfg.model).loaded == len(release) - 1


# ------------------------------------------------------------------------------------------- fine-tune
def _hf_train(hf, batches, steps: int) -> None:
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    for step in range(steps):
        batch = batches[step % len(batches)]
        keep = [i for i, t in enumerate(batch["targets"]) if len(t["labels"])]
        out = hf(pixel_values=batch["images"][keep],
                 mask_labels=[batch["targets"][i]["masks"].float() for i in keep],
                 class_labels=[batch["targets"][i]["labels"] - 1 for i in keep])  # HF classes 0..C-1
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    hf.eval()


@pytest.mark.slow
def test_finetune_from_converted_hf_weights_starts_lower(tmp_path, m2f_synthetic):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from networks.mask2former.data import Mask2FormerDataModule

    torch.manual_seed(0)
    swin = SwinConfig(image_size=128, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4,
                      drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    hf_cfg = Mask2FormerConfig(backbone_config=swin, feature_size=64, mask_feature_size=64, hidden_dim=64,
                               encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=128,
                               num_queries=8, num_labels=NUM_LABELS, train_num_points=1024,
                               use_pretrained_backbone=False)
    hf = Mask2FormerForUniversalSegmentation(hf_cfg)
    cfg = _spec_for(m2f_synthetic, hf_cfg, tmp_path)
    cfg.model.mask_former.train_num_points = 1024
    dm = Mask2FormerDataModule(cfg, RunContext(action="train", run_dir=tmp_path))
    dm.setup("fit")
    batches = [b for _, b in zip(range(3), dm.train_dataloader(), strict=False)]
    _hf_train(hf, batches, steps=40)
    path = tmp_path / "hf_trained"
    hf.save_pretrained(path)

    def first_loss(pretrained: str | None) -> float:
        cfg.train.pretrained_model_path = pretrained
        module = _train_module(cfg, tmp_path)
        module.train()
        torch.manual_seed(5)  # same point sampling in both runs
        batch = batches[0]
        with torch.no_grad():
            losses = module.criterion(module.model(batch["images"]), batch["targets"])
        return float(module._weighted(losses))

    converted, random_init = first_loss(str(path)), first_loss(None)
    print(f"first-batch loss: converted HF weights {converted:.3f}, random init {random_init:.3f}")
    assert torch.isfinite(torch.tensor([converted, random_init])).all()
    assert converted < random_init, (converted, random_init)


if __name__ == "__main__":
    print(f"wrote {len(write_tao_fixture())} keys to {TAO_FIXTURE}")
