"""Telemetry: per-step TensorBoard scalars, metrics.csv (incl. resume), plots/, ``plot_runs``, console format,
and the ``train/<term>`` / ``val/<kpi>`` naming of every network."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from networks.common.context import RunContext
from networks.common.errors import ConfigError
from tao_cli.engine.telemetry import TelemetryCallback
from tao_cli.engine.trainer import epoch_label, format_metrics
from tao_cli.plot import plot_runs

from .helpers import run

FAST = {"dataset.num_samples": 32, "dataset.batch_size": 4}  # 24 train rows -> 6 steps per epoch


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _scalars(run_dir: Path) -> dict[str, list[int]]:
    """TensorBoard scalar tag -> steps, over every version dir of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[int]] = {}
    for version in sorted((run_dir / "lightning_logs").glob("version_*")):
        acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return out


def _assert_image(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as img:
        assert img.width > 200 and img.height > 150
        lo, hi = img.convert("L").getextrema()
        assert lo < hi, f"{path} is a uniform image"


def test_two_epoch_run_logs_every_step_to_tensorboard_csv_and_plots(tmp_path, capsys):
    root = tmp_path / "r"
    assert run("train", {**FAST, "results_dir": root, "train.num_epochs": 2}) == 0
    run_dir = root / "train"

    scalars = _scalars(run_dir)
    for tag in ("train/loss", "train/lr"):
        assert sorted(set(scalars[tag])) == list(range(12)), tag  # one point per optimizer step
    assert len(scalars["val/loss"]) == 2 and len(scalars["train/loss_epoch"]) == 2
    assert not [t for t in scalars if t.startswith(("train_", "val_", "lr"))]  # one naming scheme

    header, rows = _csv(run_dir / "metrics.csv")
    assert header == ["epoch", "step", "train/lr", "train/loss", "val/loss"]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["epoch"]) for r in rows] == [0] * 6 + [1] * 6
    assert all(float(r["train/loss"]) >= 0 and float(r["train/lr"]) > 0 for r in rows)
    val_rows = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}
    status = [json.loads(line) for line in (run_dir / "status.json").read_text().splitlines()]
    evals = {r["step"]: r["kpi"]["val_loss"] for r in status if r["message"] == "Eval metrics generated."}
    assert set(val_rows) == {6, 12} and val_rows == pytest.approx(evals, rel=1e-5)
    # lr column is the LR each step used: StepLR(gamma 0.9) per epoch
    assert {float(r["train/lr"]) for r in rows[:6]} == {0.05} and float(rows[6]["train/lr"]) == pytest.approx(0.045)

    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["loss.png", "lr.png", "val.png"]
    for name in plots:
        _assert_image(run_dir / "plots" / name)

    out = capsys.readouterr().out + (run_dir / "train.log").read_text()
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "Epoch 0" not in out
    for noise in ("GPU available", "TPU available", "v_num", "FLOPs", "Flops"):
        assert noise not in out, noise


def test_resume_appends_rows_once_and_drops_rows_past_the_checkpoint(tmp_path):
    root = tmp_path / "r"
    assert run("train", {**FAST, "results_dir": root, "train.num_epochs": 1}) == 0
    path = root / "train" / "metrics.csv"
    with open(path, "a") as f:  # as if the first run had gone on past its last checkpoint before dying
        f.write("1,7,0.05,9.0,\n1,8,0.05,9.0,\n0,9")
    assert run("train", {**FAST, "results_dir": root, "train.num_epochs": 2}) == 0
    text = path.read_text()
    assert text.count("epoch,step") == 1
    header, rows = _csv(path)
    assert header == ["epoch", "step", "train/lr", "train/loss", "val/loss"]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert all(float(r["train/loss"]) != 9.0 for r in rows)
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [6, 12]
    scalars = _scalars(root / "train")
    assert sorted(set(scalars["train/loss"])) == list(range(12))


def _write_run(run_dir: Path, loss_scale: float) -> Path:
    run_dir.mkdir(parents=True)
    lines = ["epoch,step,train/lr,train/loss,train/loss_ce,val/mIoU"]
    for step in range(1, 31):
        kpi = f"{step / 30 * loss_scale:.3f}" if step % 10 == 0 else ""
        lines.append(f"{(step - 1) // 10},{step},{0.01 / step},{loss_scale / step},{loss_scale / step / 2},{kpi}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def _has_colour(path: Path, rgb: tuple[int, int, int], tol: int = 30) -> bool:
    with Image.open(path) as img:
        pixels = img.convert("RGB").getdata()
        return any(all(abs(a - b) <= tol for a, b in zip(p, rgb, strict=True)) for p in pixels)


def test_plot_runs_overlays_runs_and_rejects_a_non_run_dir(tmp_path):
    a = _write_run(tmp_path / "exp_a" / "train", 1.0)
    b = _write_run(tmp_path / "exp_b" / "train", 2.0)
    written = plot_runs([a, b])
    assert sorted(p.name for p in written) == ["loss.png", "lr.png", "val.png"]
    assert all(p.parent == a / "plots" / "compare" for p in written)
    for p in written:
        _assert_image(p)
    loss = a / "plots" / "compare" / "loss.png"
    # one colour per run: matplotlib's C0 (blue) and C1 (orange)
    assert _has_colour(loss, (31, 119, 180)) and _has_colour(loss, (255, 127, 14))

    out = tmp_path / "cmp"
    assert {p.parent for p in plot_runs([a], out=out)} == {out}

    not_run = tmp_path / "somewhere"
    not_run.mkdir()
    with pytest.raises(ConfigError, match="not a train results dir") as err:
        plot_runs([a, not_run])
    assert str(not_run) in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        plot_runs([tmp_path / "missing"])


def test_console_format_four_significant_digits_and_one_based_epochs():
    assert format_metrics({"train/loss": 0.123456, "v_num": 3, "train/loss_ce": torch.tensor(12345.678),
                           "val/mIoU": 0.5}) == "loss=0.1235 loss_ce=1.235e+04 val/mIoU=0.5"
    assert epoch_label(SimpleNamespace(current_epoch=0, max_epochs=2)) == "Epoch 1/2"
    assert epoch_label(SimpleNamespace(current_epoch=4, max_epochs=-1)) == "Epoch 5"


# --------------------------------------------------------------------------------- per-network naming
class _Capture:
    """A Lightning logger that keeps every ``(step, metrics)`` it is given."""

    def __new__(cls):
        from pytorch_lightning.loggers import Logger

        class Capture(Logger):
            def __init__(self):
                super().__init__()
                self.records: list[tuple[int, dict]] = []

            @property
            def name(self):
                return "capture"

            @property
            def version(self):
                return 0

            def log_hyperparams(self, *args, **kwargs):
                pass

            def log_metrics(self, metrics, step=None):
                self.records.append((step, dict(metrics)))

        return Capture()


def _fit_and_check_names(module, tmp_path: Path, terms: list[set], fit_args: tuple, *, steps: int = 2) -> None:
    """Fit ``steps`` steps + 1 val batch; every step logs ``train/<term>`` for each criterion term, and train/lr."""
    import pytorch_lightning as pl

    logger = _Capture()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=steps, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[TelemetryCallback(tmp_path, plots=False)])
    trainer.fit(module, *fit_args)
    assert len(terms) == steps and all(terms)
    step_records = [m for _, m in logger.records if "train/loss" in m]
    assert len(step_records) == steps
    for logged, returned in zip(step_records, terms, strict=True):
        expected = {f"train/{k}" for k in returned} | {"train/loss", "train/lr"}
        assert expected <= set(logged), expected - set(logged)
    names = {k for _, m in logger.records for k in m}
    assert all(k == "epoch" or k.startswith(("train/", "val/")) for k in names), names
    val = {k for _, m in logger.records for k in m if k.startswith("val/")}
    kpi = {k for k, v in module.kpi.items() if v is not None and v == v}  # a KPI with no data (None/NaN) is not logged
    assert kpi and {"val/loss" if k == "val_loss" else f"val/{k}" for k in kpi} <= val
    header, rows = _csv(tmp_path / "metrics.csv")
    assert {f"train/{k}" for k in terms[0]} <= set(header) and len(rows) == steps


def _spy_criterion(module) -> list[set]:
    seen: list[set] = []
    module.criterion.register_forward_hook(lambda m, args, out: seen.append(set(out)) if m.training else None)
    return seen


def test_mal_logs_every_loss_term_per_step(tmp_path, monkeypatch):
    import networks.mal.module as mal_module
    from networks.mal.data import collate_eval
    from tests.networks.mal.test_model import _EvalSet, _small_module, _TrainSet

    torch.manual_seed(0)
    module, _ = _small_module()
    seen: list[set] = []
    real = mal_module.mal_losses

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(set(out))
        return out

    monkeypatch.setattr(mal_module, "mal_losses", spy)
    train = torch.utils.data.DataLoader(_TrainSet(4, 64), batch_size=2)
    val = torch.utils.data.DataLoader(_EvalSet(2, 64), batch_size=2, collate_fn=collate_eval)
    _fit_and_check_names(module, tmp_path, seen, (train, val))
    assert seen[0] == {"loss_mil", "loss_crf"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from networks.common.synthetic import generate

    return generate(tmp_path_factory.mktemp("tel_synth"), seed=0, num_train=4, num_val=2, image_size=96)


def test_mask2former_logs_every_loss_term_incl_aux_per_step(tmp_path, synthetic):
    from networks.mask2former.data import Mask2FormerDataModule
    from networks.mask2former.module import Mask2FormerModule
    from tests.networks.mask2former.conftest import make_tiny_cfg

    cfg = make_tiny_cfg(synthetic)
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext(action="train", run_dir=tmp_path / "train"))
    seen = _spy_criterion(module)
    _fit_and_check_names(module, tmp_path, seen, (Mask2FormerDataModule(cfg, RunContext("train", Path("."))),))
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1"} <= seen[0]


def test_mask_grounding_dino_logs_every_loss_term_incl_aux_and_interm_per_step(tmp_path, synthetic):
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from tests.networks.mask_grounding_dino.conftest import make_tiny_cfg

    cfg = make_tiny_cfg(synthetic)
    cfg.dataset.batch_size = 2  # 4 images -> 2 steps
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, RunContext(action="train", run_dir=tmp_path / "train"))
    seen = _spy_criterion(module)
    _fit_and_check_names(module, tmp_path, seen, (MaskGDinoDataModule(cfg, RunContext("train", Path("."))),))
    assert {"loss_ce", "loss_bbox", "loss_mask", "loss_ce_0", "loss_ce_interm"} <= seen[0]


def test_run_logging_hides_lightning_device_lines_and_third_party_deprecations(tmp_path, capsys):
    import logging
    import warnings

    from tao_cli.engine.logs import run_logging

    with run_logging(tmp_path / "x.log"):
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False (cuda), used: False")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("Restoring states from the checkpoint")
        warnings.warn_explicit("old numpy call tel-1", DeprecationWarning, "mask.py", 91, module="pycocotools.mask")
        warnings.warn_explicit("our deprecated call tel-2", DeprecationWarning, "x.py", 3, module="networks.common.x")
        for line in (1, 2, 3):
            warnings.warn_explicit("repeated tel-3", UserWarning, "y.py", line, module="somelib.y")
    out = capsys.readouterr().out
    assert "GPU available" not in out and "Restoring states from the checkpoint" in out
    assert "tel-1" not in out and "tel-2" in out
    assert out.count("repeated tel-3") == 1
