"""``tao weights inspect|convert``, foreign checkpoints through ``tao model mal evaluate``, and the random-weights
warning of dry-run and train.log — in-process through typer's CliRunner, on MAL's tiny config."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tao_cli.cli import app

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/mal/tiny.yaml"
KEYS = REPO / "tests/networks/mal/data/tao_mal_tiny_keys.json"
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def tao(*args: str):
    return runner.invoke(app, [str(a) for a in args], prog_name="tao")


def _tao_state(seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=gen) * 0.05 for k, s in json.loads(KEYS.read_text())["keys"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from networks.common.synthetic import generate

    root = tmp_path_factory.mktemp("weights_cli")
    paths = generate(root / "data", seed=0, num_train=2, num_val=2, image_size=64)
    d = root / "data"
    return root, [f"dataset.train_ann_path={d}/train/annotations.json", f"dataset.train_img_dir={d}/train/images",
                  f"dataset.val_ann_path={d}/val/annotations.json", f"dataset.val_img_dir={d}/val/images",
                  "dataset.load_mask=true"], paths


def _vit_state():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, qkv_bias=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).state_dict()


def test_weights_help_lists_both_commands():
    result = tao("weights", "--help")
    assert result.exit_code == 0 and "inspect" in result.output and "convert" in result.output


def test_inspect_tao_checkpoint_names_format_counts_and_tag(tmp_path):
    state = _tao_state()
    f = tmp_path / "mal_model_latest.pth"
    torch.save({"state_dict": state, "tao_model": "mal", "epoch": 4, "global_step": 40}, f)
    result = tao("weights", "inspect", f)
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("container:   torch", "network:     mal", "format:      tao", "part:        model",
                 f"parameters:  {sum(t.numel() for t in state.values()):,}", "tensors:     328",
                 "dtypes:      float32 (328)", "tao_model:   mal", "epoch:       4", "step:        40",
                 "  student.backbone  (152)", "  teacher.mask_head  (8)"):
        assert line in out.splitlines(), (line, out)


def test_inspect_mae_lists_top_groups_and_more(tmp_path):
    sd = {k: v for k, v in _vit_state().items() if not k.startswith("head.")}
    f = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, f)
    result = tao("weights", "inspect", f, "--network", "mal")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "format:      mae" in lines and "part:        backbone" in lines
    groups = [line for line in lines if line.startswith("  ")]
    assert len(groups) == 13 and groups[-1] == f"  … {len({'.'.join(k.split('.')[:2]) for k in sd}) - 12} more"


def test_inspect_unknown_file_exits_2_with_the_formats_tried(tmp_path):
    f = tmp_path / "random.pth"
    torch.save({"foo.bar": torch.zeros(3)}, f)
    result = tao("weights", "inspect", f, "--network", "mal")
    assert result.exit_code == 2
    assert "format:      not recognised" in result.output
    assert "tried:       mal:tao, mal:convstem, mal:mae, mal:deit, mal:timm-vit" in result.output


def test_convert_refuses_another_networks_checkpoint_in_one_line(tmp_path):
    f = tmp_path / "m2f.pth"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "tao_model": "mask2former"}, f)
    result = tao("weights", "convert", "mal", f, "--out", tmp_path / "o.pth")
    assert result.exit_code == 2
    err = [line for line in result.output.splitlines() if line.startswith("ERROR")]
    assert len(err) == 1 and "'mask2former' checkpoint, not 'mal'" in err[0]
    assert not (tmp_path / "o.pth").exists()


def _evaluate(root, overrides, name, checkpoint):
    result = tao("model", "mal", "evaluate", "-e", TINY, f"results_dir={root / name}", *overrides,
                 f"evaluate.checkpoint={checkpoint}")
    assert result.exit_code == 0, result.output
    run = root / name / "evaluate"
    return json.loads((run / "metrics.json").read_text()), (run / "evaluate.log").read_text()


def test_converted_and_foreign_files_evaluate_like_our_checkpoint(data):
    """A student-only TAO file, its conversion (.safetensors, and inside a directory) and our own checkpoint of the
    same weights give the same metrics through `tao model mal evaluate`; the foreign one logs its load report."""
    root, overrides, _ = data
    state = _tao_state()
    student = {k: v for k, v in state.items() if k.startswith("student.")}
    both = {**student, **{"teacher." + k[len("student."):]: v for k, v in student.items()}}
    ours = root / "ours.pth"
    torch.save({"state_dict": both, "tao_model": "mal"}, ours)
    foreign = root / "tao_student.pth"
    torch.save({"state_dict": student}, foreign)
    conv = tao("weights", "convert", "mal", foreign, "--out", root / "conv" / "model.safetensors", "-e", TINY)
    assert conv.exit_code == 0, conv.output
    assert "checked against the spec's model: 328 matched, 0 newly initialised, 0 unexpected, 0 shape-mismatched" \
        in conv.output
    (root / "conv" / "config.json").write_text("{}")

    ref, _ = _evaluate(root, overrides, "ours", ours)
    got, log = _evaluate(root, overrides, "foreign", foreign)
    assert "format 'tao'" in log and "328 matched, 0 newly initialised, 0 unexpected, 0 shape-mismatched" in log
    assert got == ref
    got_st, _ = _evaluate(root, overrides, "safetensors", root / "conv" / "model.safetensors")
    assert got_st == ref
    got_dir, log_dir = _evaluate(root, overrides, "dir", root / "conv")
    assert got_dir == ref and "format 'tao'" in log_dir


def test_backbone_only_file_is_refused_as_evaluate_checkpoint(data, tmp_path):
    root, overrides, _ = data
    f = tmp_path / "deit_tiny.pth"
    torch.save({"model": _vit_state()}, f)
    result = tao("model", "mal", "evaluate", "-e", TINY, f"results_dir={tmp_path}", *overrides,
                 f"evaluate.checkpoint={f}")
    assert result.exit_code == 2
    err = [line for line in result.output.splitlines() if line.startswith("ERROR")]
    assert len(err) == 1 and "evaluate.checkpoint" in err[0] and "holds only the backbone" in err[0]


WARNING = "training from random weights with train.lr=1e-05"


def test_dry_run_warns_once_without_weights_and_not_with_a_path(data, tmp_path):
    root, overrides, _ = data
    result = tao("model", "mal", "train", "-e", TINY, f"results_dir={tmp_path / 'a'}", *overrides, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.count(WARNING) == 1 and "set train.pretrained_model_path" in result.output
    f = tmp_path / "w.pth"
    torch.save({"state_dict": _tao_state(), "tao_model": "mal"}, f)
    result = tao("model", "mal", "train", "-e", TINY, f"results_dir={tmp_path / 'b'}", *overrides, "--dry-run",
                 f"train.pretrained_model_path={f}")
    assert result.exit_code == 0, result.output
    assert "random weights" not in result.output


def test_train_log_warns_once_without_weights(data, tmp_path):
    root, overrides, _ = data
    result = tao("model", "mal", "train", "-e", TINY, f"results_dir={tmp_path}", *overrides,
                 "train.num_epochs=1", "train.validation_interval=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train" / "train.log").read_text().count(WARNING) == 1


def test_untagged_file_of_another_network_is_refused_naming_it(tmp_path, monkeypatch):
    """Recognised by another network's formats (a stand-in format here): one line naming both networks."""
    from networks.common.errors import CheckpointError
    from networks.common.weight_formats import WeightFormat, has_keys
    from tao_cli import weights_cmd
    from tao_cli.engine.actions import load_into

    fake = WeightFormat("hf", "mask2former", "model", "HF Mask2Former directory",
                        lambda s: has_keys(s, "model.pixel_level_module.*"), lambda s, c: {})
    real = weights_cmd.formats_of
    monkeypatch.setattr(weights_cmd, "formats_of", lambda n: [fake] if n == "mask2former" else real(n))
    f = tmp_path / "m2f_untagged.pth"
    torch.save({"model.pixel_level_module.encoder.w": torch.zeros(2)}, f)
    from omegaconf import OmegaConf

    import networks.mal as mal
    from networks.common.context import RunContext

    cfg = OmegaConf.merge(OmegaConf.structured(mal.ExperimentConfig), OmegaConf.load(TINY))
    module = mal.build_module(cfg, RunContext(action="evaluate", run_dir=tmp_path))
    with pytest.raises(CheckpointError) as err:
        load_into(module, f, None, "mal", field="evaluate.checkpoint")
    line = err.value.one_line()
    assert "holds mask2former weights (hf" in line and "not mal" in line and "\n" not in line
    result = tao("weights", "inspect", f)
    assert result.exit_code == 0 and "network:     mask2former" in result.output
