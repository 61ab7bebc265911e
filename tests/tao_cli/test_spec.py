"""tao_cli.spec: precedence, override grammar, interpolation, and one-line ConfigErrors for every bad input.

The schema below is a test-only stand-in for a network's ``ExperimentConfig``; no network package is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from networks.common.config import (
    MISSING,
    EvaluateConfig,
    ExperimentConfig,
    ExportConfig,
    InferenceConfig,
    TrainConfig,
    param,
)
from networks.common.errors import ConfigError
from networks.common.network import Network
from tao_cli.spec import REDACTED, all_keys, iter_fields, load_spec, lookup, to_yaml


# ------------------------------------------------------------------------------------------- toy schema
@dataclass
class ToyModel:
    """Model section."""

    backbone: str = param("resnet", description="Backbone name.", valid_options=["resnet", "vit", "swin"],
                          automl_enabled=True)
    hidden_dim: int = param(256, description="Hidden width.", display_name="Hidden dim", valid_min=64,
                            valid_max=1024, math_cond="/ 8", automl_enabled=True, popular=True)
    dropout: float = param(0.1, description="Dropout probability.", valid_min=0.0, valid_max=1.0)
    freeze: list[str] = param([], description="Module names to freeze.")
    out_indices: list[int] = param([1, 2, 3], description="Backbone stages to output.", valid_min=0, valid_max=3)
    extra: dict[str, Any] = param({}, description="Free-form options.")
    pretrained_path: str | None = param(None, description="Pretrained weights.")
    norm: str | None = param(None, description="Normalisation layer; null keeps the backbone's.",
                             valid_options=["bn", "gn"])


@dataclass
class ToyDataset:
    """Dataset section."""

    root: str = param(MISSING, description="Dataset root directory.", required=True)
    sources: list[dict[str, Any]] = param([], description="Data sources (list of dicts).")
    batch_size: int = param(2, description="Batch size.", valid_min=1)
    num_classes: int | None = param(None, description="Number of classes.", valid_min=1)
    format: str = param("coco", description="Annotation format.", valid_options="coco,odvg")
    channels: int = param(3, description="Image channels.", valid_options=["1", "3"])


@dataclass
class ToyOptim:
    """Optimiser section."""

    lr: float = param(1e-4, description="Learning rate.", valid_min=0.0, valid_max=1.0, automl_enabled=True)
    lr_steps: list[int] = param([8], description="Epochs at which the lr drops.", valid_min=1)


@dataclass
class ToyTrain(TrainConfig):
    """Train section: TAO's common fields plus a few."""

    optim: ToyOptim = param(ToyOptim, description="Optimiser.")
    precision: str = param("fp32", description="Training precision.", valid_options=["fp16", "bf16", "fp32"])
    warmup_epochs: int = param(0, description="Warm-up epochs.", valid_min=0)


@dataclass
class ToyEvaluate(EvaluateConfig):
    """Evaluate section."""

    threshold: float = param(0.5, description="Score threshold.", valid_min=0, valid_max=1)


@dataclass
class ToyExperiment(ExperimentConfig):
    """The whole toy spec."""

    model: ToyModel = param(ToyModel)
    dataset: ToyDataset = param(ToyDataset)
    train: ToyTrain = param(ToyTrain)
    evaluate: ToyEvaluate = param(ToyEvaluate)
    inference: InferenceConfig = param(InferenceConfig)
    export: ExportConfig = param(ExportConfig)


ACTIONS = {
    "train": "Train the toy model.",
    "evaluate": "Evaluate a checkpoint.",
    "inference": "Run inference.",
    "export": "Export to ONNX.",
}

toy_network = Network(
    name="toy", title="Toy", checkpoint_name="toy_model", config_class=ToyExperiment, actions=ACTIONS,
    check=lambda cfg, action: None, input_paths=lambda cfg, action: {}, build_module=lambda cfg, ctx: None,
    build_datamodule=lambda cfg, ctx: None, main_kpi=lambda cfg: ("loss", "min"),
    extra_actions={a: (lambda cfg, ctx: {}) for a in ACTIONS if a not in ("train", "evaluate", "inference")},
)


def load(overrides=(), spec: Path | None = None, action: str | None = "train", **kw) -> DictConfig:
    return load_spec(ToyExperiment, action, spec, list(overrides), **kw)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_line(excinfo: pytest.ExceptionInfo) -> str:
    line = str(excinfo.value)
    assert "\n" not in line, line
    return line


# --------------------------------------------------------------------------------------- introspection
def test_iter_fields_lists_sections_before_their_children_with_metadata():
    fields = {f.key: f for f in iter_fields(ToyExperiment)}
    keys = list(fields)
    assert keys.index("train") < keys.index("train.optim") < keys.index("train.optim.lr")
    assert fields["train.optim"].section and not fields["train.optim.lr"].section
    assert fields["train.optim.lr"].base is float and fields["train.optim.lr"].default == 1e-4
    assert fields["model.hidden_dim"].metadata["valid_max"] == 1024
    assert fields["model.pretrained_path"].optional and fields["model.pretrained_path"].base is str
    assert fields["evaluate.checkpoint"].missing and not fields["evaluate.batch_size"].missing
    assert fields["train"].default["optim"] == {"lr": 1e-4, "lr_steps": [8]}
    assert all_keys(ToyExperiment) == keys


@pytest.mark.parametrize(
    ("key", "found", "inside"),
    [
        ("train.num_epochs", "train.num_epochs", False),
        ("train", "train", False),
        ("model.extra.anything.deep", "model.extra", True),
        ("train.num_epochs.x", None, False),
        ("trian.num_epochs", None, False),
    ],
)
def test_lookup(key, found, inside):
    field, is_inside = lookup(ToyExperiment, key)
    assert (field.key if field else None) == found
    assert is_inside is inside


# ------------------------------------------------------------------------------------------ precedence
def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    spec = write(tmp_path, "train:\n  num_epochs: 4\n  seed: 7\nmodel:\n  dropout: 0.2\n")
    assert load().train.num_epochs == 10
    cfg = load(["train.num_epochs=6"], spec)
    assert (cfg.train.num_epochs, cfg.train.seed, cfg.model.dropout, cfg.train.optim.lr) == (6, 7, 0.2, 1e-4)
    assert load([], spec).train.num_epochs == 4


def test_result_is_struct_mode_with_typed_values(tmp_path):
    cfg = load(["train.optim.lr=1", "dataset.root=/data"])
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(Exception, match="lrr"):
        cfg.train.lrr = 1
    assert isinstance(cfg.train.optim.lr, float) and cfg.train.optim.lr == 1.0  # an int in a float field
    assert cfg.dataset.root == "/data"


def test_yaml_reads_scientific_notation_and_null_sections(tmp_path):
    spec = write(tmp_path, "train:\n  optim:\n    lr: 1e-3\nevaluate:\n")
    cfg = load([], spec)
    assert cfg.train.optim.lr == pytest.approx(1e-3)
    assert cfg.evaluate.threshold == 0.5  # an empty (null) section keeps its defaults


# ------------------------------------------------------------------------------------- override grammar
@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["train.num_epochs=3"], "train.num_epochs", 3),
        # one argv word containing a space: TAO's join + shlex.split broke exactly this
        (["model.freeze=[backbone.0, bert]"], "model.freeze", ["backbone.0", "bert"]),
        (["dataset.sources=[{image_dir: '/data/my images', json_file: a.json}]"], "dataset.sources",
         [{"image_dir": "/data/my images", "json_file": "a.json"}]),
        (["model.pretrained_path='/w/my weights.pth'"], "model.pretrained_path", "/w/my weights.pth"),
        (["model.pretrained_path=/w/my weights.pth"], "model.pretrained_path", "/w/my weights.pth"),
        (["model.pretrained_path=null"], "model.pretrained_path", None),
        (["+train.seed=5"], "train.seed", 5),
        (["++train.warmup_epochs=2"], "train.warmup_epochs", 2),
        (["model.extra.foo=1"], "model.extra", {"foo": 1}),
        (["train.cudnn={benchmark: true}"], "train.cudnn", {"benchmark": True, "deterministic": True}),
        (["dataset.channels=1"], "dataset.channels", 1),
        (["model.norm=gn"], "model.norm", "gn"),
        (["model.norm=gn", "model.norm=null"], "model.norm", None),
        (["train.num_epochs=7", "~train.num_epochs"], "train.num_epochs", 10),
        (["~train.num_epochs=10"], "train.num_epochs", 10),
        (["train.optim.lr=0.5", "train.optim.lr_steps=[2,4]", "~train.optim"], "train.optim",
         {"lr": 1e-4, "lr_steps": [8]}),
        (["model.extra.foo=1", "~model.extra.foo"], "model.extra", {}),
        (["train.num_epochs=2", "train.warmup_epochs=${train.num_epochs}"], "train.warmup_epochs", 2),
        (["model.pretrained_path=${dataset.root}/w.pth", "dataset.root=/d"], "model.pretrained_path", "/d/w.pth"),
    ],
)
def test_overrides(overrides, key, expected):
    cfg = load(overrides)
    value = OmegaConf.select(cfg, key)
    if isinstance(value, (DictConfig, list)) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    assert value == expected
    leaf_parent, _, leaf = key.rpartition(".")
    assert not OmegaConf.is_interpolation(OmegaConf.select(cfg, leaf_parent) if leaf_parent else cfg, leaf)


def test_interpolation_from_yaml_is_resolved_after_cli(tmp_path):
    spec = write(tmp_path, "train:\n  num_epochs: 4\n  warmup_epochs: ${train.num_epochs}\n")
    cfg = load(["train.num_epochs=6"], spec)
    assert cfg.train.warmup_epochs == 6
    assert not OmegaConf.is_interpolation(cfg.train, "warmup_epochs")


def test_overrides_must_be_a_list_not_one_string():
    with pytest.raises(TypeError):
        load_spec(ToyExperiment, "train", None, "train.num_epochs=3")


# ----------------------------------------------------------------------------------------------- errors
TRAIN_KEYS = ("(hint: valid keys in 'train': num_gpus, gpu_ids, num_nodes, seed, cudnn, num_epochs, "
              "checkpoint_interval, checkpoint_interval_unit, ... (7 more))")

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # unknown keys: did-you-mean in the same section, across sections, for a misspelt section
        (["train.num_epoch=3"],
         "train.num_epoch: unknown key in override 'train.num_epoch=3' (hint: did you mean 'train.num_epochs'?)"),
        (["num_epochs=3"], "num_epochs: unknown key in override 'num_epochs=3' (hint: did you mean 'train.num_epochs'?)"),
        (["trian.num_epochs=3"],
         "trian.num_epochs: unknown key in override 'trian.num_epochs=3' (hint: did you mean 'train.num_epochs'?)"),
        (["model.hiden_dim=8"],
         "model.hiden_dim: unknown key in override 'model.hiden_dim=8' (hint: did you mean 'model.hidden_dim'?)"),
        (["train.optim.zzzz=1"],
         "train.optim.zzzz: unknown key in override 'train.optim.zzzz=1' (hint: valid keys in 'train.optim': lr, lr_steps)"),
        (["train.cudnn={benchmark: true, fast: 1}"],
         "train.cudnn.fast: unknown key in override 'train.cudnn={benchmark: true, fast: 1}' "
         "(hint: valid keys in 'train.cudnn': benchmark, deterministic)"),
        (["train.num_epochs.x=1"],
         "train.num_epochs.x: unknown key in override 'train.num_epochs.x=1' "
         "(hint: 'train.num_epochs' holds a value, not a section)"),
        (["~train.nope"], "train.nope: unknown key in override '~train.nope' " + TRAIN_KEYS),
        # + may not add keys outside the schema
        (["+train.foo=1"], "train.foo: may not add keys outside the schema ('+train.foo=1') " + TRAIN_KEYS),
        (["+newsection.x=1"], "newsection.x: may not add keys outside the schema ('+newsection.x=1') "
                              "(hint: valid keys in the top level: model_name, encryption_key, results_dir, wandb, "
                              "model, dataset, train, evaluate, ... (2 more))"),
        # wrong types
        (["train.num_gpus=x"], "train.num_gpus: 'x' is not an integer"),
        (["train.num_gpus=2.0"], "train.num_gpus: 2.0 is not an integer"),
        (["train.num_gpus=null"], "train.num_gpus: null is not allowed, expected an integer"),
        (["train.cudnn.benchmark=maybe"], "train.cudnn.benchmark: 'maybe' is not a boolean (true/false)"),
        (["train.gpu_ids=[0,x]"], "train.gpu_ids[1]: 'x' is not an integer"),
        (["model.freeze=3"], "model.freeze: 3 is not a list of strings"),
        (["model.freeze=[[1]]"], "model.freeze[0]: [1] is not a string"),
        (["train.results_dir=[1]"], "train.results_dir: [1] is not a string or null"),
        (["train=5"], "train: 5 is not a section (a mapping of keys) ('train=5') "
                      "(hint: set its keys one by one, e.g. train.<name>=<value>)"),
        # ranges (every element of a list too) and options (compared as the field type)
        (["train.num_epochs=0"], "train.num_epochs: 0 is out of range [1, inf)"),
        (["model.dropout=1.5"], "model.dropout: 1.5 is out of range [0.0, 1.0]"),
        (["model.hidden_dim=2048"], "model.hidden_dim: 2048 is out of range [64, 1024]"),
        (["model.out_indices=[0,5]"], "model.out_indices[1]: 5 is out of range [0, 3]"),
        (["train.optim.lr_steps=[0]"], "train.optim.lr_steps[0]: 0 is out of range [1, inf)"),
        (["dataset.num_classes=0"], "dataset.num_classes: 0 is out of range [1, inf)"),
        (["model.backbone=resnt"], "model.backbone: 'resnt' is not one of ['resnet', 'vit', 'swin'] "
                                   "(hint: did you mean 'resnet'?)"),
        (["dataset.channels=2"], "dataset.channels: 2 is not one of [1, 3]"),
        (["model.norm=ln"], "model.norm: 'ln' is not one of ['bn', 'gn']"),
        (["train.checkpoint_interval_unit=epochs"],
         "train.checkpoint_interval_unit: 'epochs' is not one of ['epoch', 'step'] (hint: did you mean 'epoch'?)"),
        # interpolation
        (["train.num_epochs=${nope}"], "train.num_epochs: cannot resolve ${nope}: Interpolation key 'nope' not found "
                                       "(hint: point the ${...} at an existing key)"),
        (["train.num_epochs=${model.backbone}"],
         "train.num_epochs: ${model.backbone} gives 'resnet', which is not an integer"),
        (["train.num_epochs=${eval:'1+1'}"],
         "train.num_epochs: cannot resolve ${eval:'1+1'}: unsupported resolver 'eval' "
         "(hint: resolvers such as ${eval:...} are not supported; write the value itself)"),
        # grammar
        (["train.num_epochs=1,2"], "train.num_epochs=1,2: sweeps (several values) are not supported "
                                   "(hint: give one value; for a list write key=[a,b], for text with commas quote it)"),
        (["~train.num_epochs=5"], "train.num_epochs: cannot reset: the value is 10, not 5 ('~train.num_epochs=5') "
                                  "(hint: write ~train.num_epochs to reset it whatever its value)"),
    ],
)
def test_override_errors(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides)
    assert error_line(excinfo) == message
    assert excinfo.value.exit_code == 2


def test_unparsable_override_names_the_word():
    with pytest.raises(ConfigError) as excinfo:
        load(["train.num_epochs=[1"])
    assert error_line(excinfo).startswith("train.num_epochs=[1: cannot parse the override (")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  num_epochs: 3\n  lrr: 1\n", "train.lrr: unknown key in spec.yaml:3 (hint: did you mean 'train.optim.lr'?)"),
        ("trian:\n  num_epochs: 1\n", "trian: unknown key in spec.yaml:1 (hint: did you mean 'train'?)"),
        ("model:\n  backbone: vit\n  hidden_dimm: 8\n",
         "model.hidden_dimm: unknown key in spec.yaml:3 (hint: did you mean 'model.hidden_dim'?)"),
        ("train:\n  num_gpus: 2.0\n", "train.num_gpus: 2.0 is not an integer (spec.yaml:2)"),
        ("train:\n  num_gpus: abc\n", "train.num_gpus: 'abc' is not an integer (spec.yaml:2)"),
        ("train: 5\n", "train: 5 is not a section (a mapping of keys) in spec.yaml:1 "
                       "(hint: write `train:` followed by indented `key: value` lines)"),
        ("model:\n  dropout: -0.5\n", "model.dropout: -0.5 is out of range [0.0, 1.0]"),
        ("dataset:\n  format: voc\n", "dataset.format: 'voc' is not one of ['coco', 'odvg']"),
    ],
)
def test_yaml_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as excinfo:
        load([], write(tmp_path, text))
    assert error_line(excinfo) == message


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("train:\n  num_epochs: 1\n  optim: [1\n", 4, "YAML syntax error: expected ',' or ']'"),
        ("train:\n  num_epochs: 1\n  num_epochs: 2\n", 3, "YAML syntax error: found duplicate key num_epochs"),
        ("train:\n  num_epochs: 1\n bad: 2\n", 3, "YAML syntax error: expected <block end>"),
        ("train:\n\tnum_epochs: 1\n", 2, "YAML syntax error: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_syntax_error_gives_file_and_line(tmp_path, text, line, problem):
    spec = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load([], spec)
    assert excinfo.value.subject == f"{spec}:{line}"
    assert excinfo.value.problem.startswith(problem)
    error_line(excinfo)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n"])
def test_yaml_top_level_must_be_a_mapping(tmp_path, text):
    spec = write(tmp_path, text)
    with pytest.raises(ConfigError, match="must be a mapping of keys at the top level") as excinfo:
        load([], spec)
    assert excinfo.value.subject == str(spec)


def test_empty_yaml_gives_defaults(tmp_path):
    assert OmegaConf.to_container(load([], write(tmp_path, ""))) == OmegaConf.to_container(load())


@pytest.mark.parametrize(("make", "problem"), [(lambda p: p / "nope.yaml", "spec file not found"),
                                               (lambda p: p, "spec path is not a file")])
def test_spec_path_problems(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        load([], path)
    assert error_line(excinfo) == f"{path}: {problem} (hint: check the -e path)"


# -------------------------------------------------------------------------------------------- mandatory
@pytest.mark.parametrize(
    ("action", "overrides", "message"),
    [
        ("evaluate", [], "evaluate.checkpoint: a value is required for 'evaluate' "
                         "(hint: set evaluate.checkpoint=/path/to.pth)"),
        ("export", ["export.checkpoint=/m.pth"], "export.onnx_file: a value is required for 'export' "
                                                 "(hint: set export.onnx_file=/path/to.onnx)"),
        ("evaluate", ["evaluate.checkpoint=${dataset.root}/m.pth"],
         "evaluate.checkpoint: a value is required for 'evaluate' (hint: set evaluate.checkpoint=/path/to.pth)"),
    ],
)
def test_missing_mandatory_value_in_the_action_section(action, overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        load(overrides, action=action)
    assert error_line(excinfo) == message


def test_missing_values_outside_the_action_section_stay_missing():
    cfg = load([], action="train")  # dataset.root and evaluate.checkpoint are ??? but not in `train`
    assert OmegaConf.is_missing(cfg.dataset, "root")
    assert OmegaConf.is_missing(cfg.evaluate, "checkpoint")
    cfg = load(["evaluate.checkpoint=/m.pth"], action="evaluate")
    assert cfg.evaluate.checkpoint == "/m.pth"


def test_mandatory_false_keeps_missing_values():
    cfg = load([], action="evaluate", mandatory=False)
    assert OmegaConf.is_missing(cfg.evaluate, "checkpoint")


# ----------------------------------------------------------------------------------------------- check
def test_check_runs_last_on_the_validated_config():
    seen = []

    def check(cfg, action):
        assert OmegaConf.is_struct(cfg)
        seen.append((cfg.train.num_epochs, action))
        if cfg.train.warmup_epochs >= cfg.train.num_epochs:
            raise ConfigError("train.warmup_epochs", "must be smaller than train.num_epochs")

    load(["train.num_epochs=3"], check=check)
    assert seen == [(3, "train")]
    with pytest.raises(ConfigError, match="must be smaller"):
        load(["train.num_epochs=3", "train.warmup_epochs=3"], check=check)
    with pytest.raises(ConfigError, match="out of range"):  # the metadata error comes first
        load(["train.num_epochs=0"], check=check)
    assert len(seen) == 2


# ------------------------------------------------------------------------------------------------ yaml
def test_to_yaml_redacts_secrets_and_round_trips(tmp_path):
    cfg = load(["encryption_key=s3cret", "train.num_epochs=4", "dataset.root=/data"])
    text = to_yaml(cfg)
    assert "s3cret" not in text
    data = yaml.safe_load(text)
    assert data["encryption_key"] == REDACTED
    assert data["train"]["num_epochs"] == 4
    assert data["evaluate"]["checkpoint"] == "???"
    again = load([], write(tmp_path, to_yaml(cfg, redact=())))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert yaml.safe_load(to_yaml(load()))["encryption_key"] is None  # nothing to hide


def test_no_eval_resolver_is_registered(tmp_path):
    """TAO's ``${eval:...}`` ran Python on spec text: a spec file using it is refused with one line, the code in
    it never runs, and loading specs leaves no ``eval`` resolver registered."""
    marker = tmp_path / "ran"
    code = f'__import__("pathlib").Path("{marker}").touch() or 3'
    spec = write(tmp_path, f"train:\n  num_epochs: ${{eval:'{code}'}}\n")
    with pytest.raises(ConfigError) as exc:
        load([], spec)
    assert exc.value.subject == "train.num_epochs" and "unsupported resolver 'eval'" in exc.value.problem
    assert not marker.exists()
    assert not OmegaConf.has_resolver("eval")
