"""Onboarding traps a newcomer hits in the first hour: each gives the right plan or one clear line.

* a re-used ``experiment.yaml`` with a new ``results_dir=`` starts a new run there (it used to resume the old
  one, whose resolved ``train.results_dir`` the file stores);
* a missing dataset path says which command writes the demo data, or which key to set;
* ``num_gpus=2`` without CUDA says it runs CPU processes;
* ``--dry-run`` refuses what a real run would refuse at start: an unavailable text encoder, a backbone that is
  not implemented, fsdp on a CPU, tao-deploy actions.
"""
from __future__ import annotations

import pytest

from networks.common.errors import ConfigError
from networks.common.synthetic import generate
from networks.common.tensorrt_engine import tensorrt_missing
from tao_cli import registry
from tao_cli.cli import run_model
from tao_cli.engine.devices import plan_devices
from tao_cli.paths import configs_dir

BORING_SPEC = """\
results_dir: {root}
dataset:
  num_samples: 16
  batch_size: 4
train:
  num_epochs: 1
"""


@pytest.fixture()
def boring(monkeypatch):
    monkeypatch.setitem(registry._extra, "boring", "boring_net")


def _plan_lines(out: str) -> dict[str, str]:
    plan = out.split("# Plan", 1)[1]
    return {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
            for line in plan.splitlines() if ":" in line and not line.startswith(" ")}


def test_reused_experiment_yaml_with_new_results_dir_starts_a_new_run(tmp_path, boring, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(BORING_SPEC.format(root=tmp_path / "a"))
    assert run_model("boring", "train", str(spec), []) == 0
    old = tmp_path / "a" / "train"
    reused = old / "experiment.yaml"
    old_status = (old / "status.json").read_text()
    capsys.readouterr()

    # Re-used as is: it resumes the old run, and the plan says why.
    assert run_model("boring", "train", str(reused), [], dry_run=True) == 0
    plan = _plan_lines(capsys.readouterr().out)
    assert plan["results dir"].startswith(str(old)) and "train.results_dir in the spec file" in plan["results dir"]
    assert plan["resume from"].startswith(str(old / "model_epoch_000_step_00003.pth"))
    assert "latest checkpoint in the results dir" in plan["resume from"]

    # With a new results_dir on the command line, that directory wins and training starts from scratch.
    new_root = tmp_path / "b"
    assert run_model("boring", "train", str(reused), [f"results_dir={new_root}"], dry_run=True) == 0
    plan = _plan_lines(capsys.readouterr().out)
    assert plan["results dir"].startswith(f"{new_root / 'train'} (results_dir on the command line")
    assert f"replaces train.results_dir={old}" in plan["results dir"]
    assert plan["resume from"].startswith("none")
    assert run_model("boring", "train", str(reused), [f"results_dir={new_root}"]) == 0
    assert (new_root / "train" / "boring_model_latest.pth").exists()
    assert (old / "status.json").read_text() == old_status  # the old run was not touched

    # train.results_dir given on the command line beats results_dir given there too.
    own = tmp_path / "own"
    assert run_model("boring", "train", str(reused), [f"results_dir={new_root}", f"train.results_dir={own}"],
                     dry_run=True) == 0
    assert _plan_lines(capsys.readouterr().out)["results dir"].startswith(f"{own} (train.results_dir on the command")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: "), err
    return err[0]


def test_missing_synthetic_dataset_says_which_command_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_model("mal", "train", str(configs_dir() / "mal" / "demo.yaml"), [], dry_run=True) == 2
    line = _error_line(capsys)
    assert line.startswith("ERROR: dataset.") and "does not exist" in line
    assert "tao dataset synthetic --out data/synthetic" in line


def test_missing_own_dataset_names_the_key_to_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_model("mal", "train", str(configs_dir() / "mal" / "demo.yaml"),
                     ["dataset.train_ann_path=/nowhere/train.json"], dry_run=True) == 2
    line = _error_line(capsys)
    assert line.startswith("ERROR: dataset.train_ann_path: /nowhere/train.json does not exist")
    assert "set dataset.train_ann_path=" in line


def test_num_gpus_without_cuda_says_it_runs_cpu_processes(tmp_path, boring, capsys):
    plan = plan_devices(2, [0], 1, env={}, cuda_count=0)
    assert plan.accelerator == "cpu" and plan.world_size == 2
    assert any("runs 2 CPU processes" in w for w in plan.warnings)
    assert not plan_devices(1, [0], 1, env={}, cuda_count=0).warnings
    assert not plan_devices(2, [0, 1], 1, env={}, cuda_count=2).warnings

    spec = tmp_path / "spec.yaml"
    spec.write_text(BORING_SPEC.format(root=tmp_path / "r"))
    monkeypatch_env = pytest.MonkeyPatch()
    monkeypatch_env.setattr("tao_cli.engine.devices._cuda_count", lambda: 0)
    try:
        assert run_model("boring", "train", str(spec), ["train.num_gpus=2"], dry_run=True) == 0
    finally:
        monkeypatch_env.undo()
    out = capsys.readouterr().out
    assert "warning:    no CUDA device is visible: num_gpus=2 runs 2 CPU processes" in out
    assert "ddp (gloo)" in _plan_lines(out)["strategy"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("first_hour") / "synthetic", seed=3, num_train=2, num_val=2,
                    image_size=64)


def _mgd_data(data) -> list[str]:
    tr, va = data["train"]["dir"], data["val"]["dir"]
    return [f"dataset.train_data_sources=[{{image_dir: {tr / 'images'}, json_file: {tr / 'annotations_odvg.jsonl'}, "
            f"label_map: {tr / 'annotations_odvg_labelmap.json'}}}]",
            f"dataset.val_data_sources={{image_dir: {va / 'images'}, json_file: {va / 'annotations.json'}}}"]


def test_dry_run_refuses_a_text_encoder_that_is_not_available(tmp_path, synthetic, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    spec = str(configs_dir() / "mask_grounding_dino" / "tiny.yaml")
    base = [f"results_dir={tmp_path / 'r'}", *_mgd_data(synthetic)]
    assert run_model("mask_grounding_dino", "train", spec, base, dry_run=True) == 0  # the bundled encoder
    capsys.readouterr()
    assert run_model("mask_grounding_dino", "train", spec, [*base, "model.text_encoder_type=bert-base-uncased"],
                     dry_run=True) == 2
    line = _error_line(capsys)
    assert line.startswith("ERROR: model.text_encoder_type: 'bert-base-uncased'")
    assert "not in the local Hugging Face cache" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, subject, words", [
    ("model.backbone=resnet_50", "model.backbone", "not implemented"),
    ("train.distributed_strategy=fsdp", "train.distributed_strategy", "fsdp needs CUDA"),
])
def test_dry_run_refuses_what_the_run_would_refuse(tmp_path, synthetic, override, subject, words, monkeypatch,
                                                   capsys):
    monkeypatch.setattr("tao_cli.engine.devices._cuda_count", lambda: 0)
    spec = str(configs_dir() / "mask_grounding_dino" / "tiny.yaml")
    try:
        code = run_model("mask_grounding_dino", "train", spec,
                         [f"results_dir={tmp_path / 'r'}", *_mgd_data(synthetic), override], dry_run=True)
    except ConfigError as exc:  # refused while loading the spec
        line = f"ERROR: {exc.one_line()}"
    else:
        assert code == 2
        line = _error_line(capsys)
    assert line.startswith(f"ERROR: {subject}: ") and words in line
    assert not (tmp_path / "r").exists()


# quantize is an action of its own (tests/networks/{mask2former,mask_grounding_dino}/test_quantize.py), and so is
# gen_trt_engine (tests/networks/*/test_tensorrt.py): without TensorRT and a GPU, the dry run refuses it at load
@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT and a GPU are present: gen_trt_engine would run")
@pytest.mark.parametrize("network", ["mask2former", "mask_grounding_dino"])
def test_dry_run_refuses_gen_trt_engine_without_tensorrt(tmp_path, network, capsys):
    action = "gen_trt_engine"
    # its mandatory fields, so that the refusal is about what the machine lacks
    overrides = [f"results_dir={tmp_path / 'r'}", f"{action}.onnx_file={tmp_path / 'm.onnx'}",
                 f"{action}.trt_engine={tmp_path / 'm.engine'}"]
    assert run_model(network, action, None, overrides, dry_run=True) == 2
    line = _error_line(capsys)
    assert line.startswith(f"ERROR: {action}: ") and ("tensorrt" in line or "CUDA GPU" in line), line
    assert not (tmp_path / "r").exists()
