"""`make learn-rela`: Mask Grounding DINO's ReLA branch on the synthetic referring split, through the real CLI.

The flow of tests/networks/mask_grounding_dino/test_rela_learning.py with a validation curve: generate the
referring split (``networks.common.synthetic.generate(seed 0, LEARN_IMAGES train images, 96 px, referring=True,
no_target_every=4)``),
evaluate the untrained weights of configs/mask_grounding_dino/rela_learn.yaml, ``tao model mask_grounding_dino
train`` for ``LEARN_EPOCHS`` epochs validating every ``LEARN_VAL_EVERY`` on the training expressions (referring
evaluator: gIoU = ``val_mIoU``, the main KPI), then evaluate the latest checkpoint.  Prints the curve (step,
train loss, val gIoU / cIoU / T_acc / N_acc) and untrained vs trained, and writes
``benchmarks/results/learn_rela.json``.

Environment: ``LEARN_EPOCHS`` (default 72, the spec's), ``LEARN_VAL_EVERY`` (default 4), ``LEARN_IMAGES`` (default 16).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("mIoU", "overall_IoU", "T_acc", "N_acc")


def _evaluate(spec: Path, overrides: list[str], results: Path, checkpoint: Path) -> dict:
    from tao_cli.cli import run_model

    code = run_model("mask_grounding_dino", "evaluate", str(spec),
                     overrides + [f"results_dir={results}", f"evaluate.checkpoint={checkpoint}"])
    if code != 0:
        raise SystemExit(f"evaluate failed (exit {code}); see {results}/evaluate")
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    return {k: metrics[f"test_{k}"] for k in KEYS}


def _curve(metrics_csv: Path) -> list[dict]:
    """Validation rows of the run's metrics.csv: step, epoch and the referring KPIs (val/<name>)."""
    out = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/mIoU"):
                out.append({"step": int(float(row["step"])), "epoch": row.get("epoch"),
                            **{k: float(row[f"val/{k}"]) for k in KEYS if row.get(f"val/{k}")}})
    return out


def main() -> dict:
    import torch

    from networks.common.context import RunContext
    from networks.common.io import atomic_write_json
    from networks.common.synthetic import generate
    from tao_cli import registry
    from tao_cli.cli import run_model
    from tao_cli.paths import configs_dir
    from tao_cli.spec import load_spec

    epochs = int(os.environ.get("LEARN_EPOCHS", "72"))
    every = int(os.environ.get("LEARN_VAL_EVERY", "4"))
    images = int(os.environ.get("LEARN_IMAGES", "16"))
    spec = configs_dir() / "mask_grounding_dino" / "rela_learn.yaml"
    with tempfile.TemporaryDirectory(prefix="learn_rela_") as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "data", seed=0, num_train=images, num_val=4, image_size=96, referring=True,
                        no_target_every=4)
        tr = data["train"]
        overrides = [f"dataset.train_data_sources=[{{image_dir: {tr['images']}, json_file: {tr['referring']}}}]",
                     f"dataset.val_data_sources={{image_dir: {tr['images']}, json_file: {tr['referring']}, "
                     "data_type: VG}", f"train.num_epochs={epochs}", f"train.checkpoint_interval={epochs}",
                     f"train.validation_interval={min(every, epochs)}"]
        net = registry.load("mask_grounding_dino")
        cfg = load_spec(net.config_class, "train", spec, overrides, mandatory=False)
        torch.manual_seed(int(cfg.train.seed))
        module = net.build_module(cfg, RunContext("evaluate", tmp, log=logging.getLogger("learn_rela")))
        ckpt = tmp / "untrained.pth"
        torch.save({"state_dict": module.state_dict(), "tao_model": "mask_grounding_dino", "epoch": 0,
                    "global_step": 0}, ckpt)
        del module
        before = _evaluate(spec, overrides, tmp / "untrained", ckpt)
        t0 = time.perf_counter()
        if run_model("mask_grounding_dino", "train", str(spec), overrides + [f"results_dir={tmp / 'run'}"]) != 0:
            raise SystemExit("train failed")
        seconds = time.perf_counter() - t0
        curve = _curve(tmp / "run" / "train" / "metrics.csv")
        after = _evaluate(spec, overrides, tmp / "trained", tmp / "run" / "train" / "mask_gdino_model_latest.pth")
    print(f"\n{'step':>6s}" + "".join(f"{k:>13s}" for k in KEYS))
    for row in curve:
        print(f"{row['step']:6d}" + "".join(f"{row.get(k, float('nan')):13.3f}" for k in KEYS))
    print(f"\n{'':10s}" + "".join(f"{k:>13s}" for k in KEYS))
    for name, m in (("untrained", before), ("trained", after)):
        print(f"{name:10s}" + "".join(f"{m[k]:13.3f}" for k in KEYS))
    print(f"training: {epochs} epochs in {seconds:.0f} s (gIoU = mIoU, cIoU = overall_IoU)")
    result = {"config": {"spec": spec.relative_to(Path(__file__).resolve().parents[1]).as_posix(), "epochs": epochs, "images": images, "train_seconds": round(seconds, 1)},
              "untrained": before, "trained": after, "curve": curve}
    atomic_write_json(RESULTS / "learn_rela.json", result, indent=2)
    print(f"results written to {RESULTS / 'learn_rela.json'}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
