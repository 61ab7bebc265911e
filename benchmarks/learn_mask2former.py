"""`make learn` (Mask2Former part): train ours and HuggingFace's Mask2Former with the same config, data and
wall-clock budget, then score both with OUR evaluation code on the synthetic val split.

Config (both models, random init, nothing downloaded): Swin embed 48, depths 2-2-2-2, heads 3-6-12-24, window 4;
pixel decoder width 128 with 2 deformable encoder layers; 20 queries, hidden 128, 6 decoder predictions
(``dec_layers`` = HF ``decoder_layers`` = 6); paper loss (class 2, mask 5, dice 5, no-object 0.1, 12544 points).
Training: 128 px crops from our train DataModule (same seed → the same batches in the same order for both),
batch 8, AdamW lr 2e-4 / weight decay 0.05 on every parameter, global grad-norm clip 0.1, constant rate, for
``LEARN_MINUTES`` (default 8) of wall clock each, data loading included.  HF gets the same batches:
``pixel_values``, ``pixel_mask`` (1 = real pixel), ``mask_labels`` (float [N, H, W]) and ``class_labels``
(HF's 0-based classes: ours − 1; HF's no-object is the last logit, ours index 0).

Evaluation: each model is wrapped so that it returns our output dict (HF's class axis rolled: no-object last →
first), then our :class:`~networks.mask2former.module.Mask2FormerModule` evaluation (post-processing at the
original resolution, mIoU, PQ/PQ_th/PQ_st) runs on the val split.  Results go to
``benchmarks/results/learn_mask2former.json`` and a side-by-side table is printed.

Environment: ``LEARN_MINUTES`` (float), ``LEARN_NUM_TRAIN`` / ``LEARN_NUM_VAL`` (synthetic images, default
256 / 32), ``LEARN_THREADS`` (torch threads, default: all cores).  Runs on CUDA when available.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LABELS = 5  # synthetic set: circle, square, triangle (things), sky, ground (stuff)

# Shared architecture (HF names); ours is derived from the HF config by networks.mask2former.convert.
SMALL: dict[str, Any] = {
    "embed_dim": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 4,
    "feature_size": 128, "mask_feature_size": 128, "hidden_dim": 128, "encoder_layers": 2, "decoder_layers": 6,
    "num_attention_heads": 8, "dim_feedforward": 512, "num_queries": 20, "train_num_points": 12544,
}
METRICS = ("mIoU", "PQ", "PQ_th", "PQ_st", "SQ", "RQ", "pixel_accuracy")


def hf_config(arch: dict[str, Any] | None = None, num_labels: int = NUM_LABELS):
    """``transformers.Mask2FormerConfig`` for ``arch`` (keys of :data:`SMALL`), random-init Swin backbone."""
    from transformers import Mask2FormerConfig, SwinConfig

    a = dict(SMALL, **(arch or {}))
    swin = SwinConfig(image_size=224, patch_size=4, embed_dim=a["embed_dim"], depths=a["depths"],
                      num_heads=a["num_heads"], window_size=a["window_size"], drop_path_rate=0.0,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=swin, feature_size=a["feature_size"],
                             mask_feature_size=a["mask_feature_size"], hidden_dim=a["hidden_dim"],
                             encoder_feedforward_dim=1024, encoder_layers=a["encoder_layers"],
                             decoder_layers=a["decoder_layers"], num_attention_heads=a["num_attention_heads"],
                             dim_feedforward=a["dim_feedforward"], num_queries=a["num_queries"],
                             num_labels=num_labels, dropout=0.0, train_num_points=a["train_num_points"],
                             use_pretrained_backbone=False, use_auxiliary_loss=True)


def build_hf_model(cfg) -> nn.Module:
    """A randomly initialised ``Mask2FormerForUniversalSegmentation`` (nothing downloaded)."""
    from transformers import Mask2FormerForUniversalSegmentation

    return Mask2FormerForUniversalSegmentation(cfg)


def our_spec(hf_cfg, arch: dict[str, Any] | None = None):
    """Our full experiment spec (struct DictConfig) whose model matches ``hf_cfg``; data paths left empty.

    Dataset/augmentation follow configs/mask2former/learn.yaml at 128 px.
    """
    from networks.mask2former.config import ExperimentConfig
    from networks.mask2former.convert import hf_config_to_spec_overrides

    a = dict(SMALL, **(arch or {}))
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "mask2former"
                                         / "learn.yaml"))
    cfg = OmegaConf.merge(cfg, hf_config_to_spec_overrides(hf_cfg))
    cfg.model.mask_former.train_num_points = a["train_num_points"]
    cfg.model.test_topk_per_image = a["num_queries"]
    return cfg


def point_at_data(cfg, data: dict, batch_size: int) -> None:
    """Set the dataset section of ``cfg`` to a ``networks.common.synthetic.generate`` result (folders)."""
    cfg.dataset.label_map = str(data["train"]["label_map"])
    cfg.dataset.test.img_dir = str(data["val"]["images"])
    for split in ("train", "val"):
        p, s = data[split], cfg.dataset[split]
        s.type = "coco_panoptic"
        s.panoptic_json, s.img_dir, s.panoptic_dir = str(p["panoptic_json"]), str(p["images"]), str(p["panoptic_dir"])
        s.batch_size, s.num_workers = batch_size, 0


class HFAsOurs(nn.Module):
    """Wraps an HF Mask2Former: forward(images [B,3,H,W]) → our dict (``pred_logits`` [B,Q,C+1] with no-object
    at index 0, ``pred_masks`` [B,Q,H/4,W/4] logits, ``aux_outputs``)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @staticmethod
    def _roll(logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits[..., -1:], logits[..., :-1]], dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        out = self.hf(pixel_values=images, output_auxiliary_logits=True)
        aux = [{"pred_logits": self._roll(a["class_queries_logits"]), "pred_masks": a["masks_queries_logits"]}
               for a in (out.auxiliary_logits or [])]
        return {"pred_logits": self._roll(out.class_queries_logits), "pred_masks": out.masks_queries_logits,
                "aux_outputs": aux}


def hf_loss(hf: nn.Module, batch: dict) -> torch.Tensor:
    """HF's own training loss on one of our batches (our labels 1..C → HF 0..C-1)."""
    targets = batch["targets"]
    out = hf(pixel_values=batch["images"], pixel_mask=batch["pixel_mask"].long(),
             mask_labels=[t["masks"].float() for t in targets], class_labels=[t["labels"] - 1 for t in targets])
    return out.loss


def our_loss(module, batch: dict) -> torch.Tensor:
    """Our weighted training loss (criterion + the module's loss weights) on one batch."""
    return module._weighted(module.criterion(module.model(batch["images"]), batch["targets"]))


def to_device(batch: dict, dev: torch.device) -> dict:
    """``images``, ``pixel_mask`` and target tensors moved to ``dev`` (the rest stays on the host)."""
    out = dict(batch)
    out["images"] = batch["images"].to(dev)
    out["pixel_mask"] = batch["pixel_mask"].to(dev)
    out["targets"] = [{k: v.to(dev) for k, v in t.items()} for t in batch["targets"]]
    return out


def train_for(loss_fn, model: nn.Module, cfg, seconds: float, dev: torch.device, lr: float = 2e-4,
              weight_decay: float = 0.05, clip: float = 0.1, seed: int = 0) -> dict:
    """Train ``model`` with ``loss_fn(batch)`` on our train loader until ``seconds`` of wall clock have passed.

    Returns ``{"steps", "seconds", "first_loss", "last_loss"}`` (losses: mean of the first/last 10 steps).
    """
    from networks.common.context import RunContext
    from networks.mask2former.data import Mask2FormerDataModule

    torch.manual_seed(seed)
    dm = Mask2FormerDataModule(cfg, RunContext("train", Path(".")))
    dm.setup("fit")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    epoch = 0
    while time.perf_counter() - start < seconds:
        torch.manual_seed(seed + epoch)  # the loader's shuffle and augmentation: same order for both models
        for batch in dm.train_dataloader():
            # The loader draws its augmentation from the global CPU RNG; the models' own draws (point sampling)
            # run on a forked RNG so both models see exactly the same batches.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + len(losses))
                loss = loss_fn(to_device(batch, dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            losses.append(float(loss.detach()))
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    took = time.perf_counter() - start
    return {"steps": len(losses), "seconds": round(took, 1), "epochs": epoch,
            "first_loss": sum(losses[:10]) / max(len(losses[:10]), 1),
            "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1)}


@torch.no_grad()
def evaluate(model: nn.Module, cfg, dev: torch.device) -> dict[str, float]:
    """Our evaluation (``Mask2FormerModule`` eval steps + metrics) of ``model`` (our output dict) on dataset.val."""
    from networks.common.context import RunContext
    from networks.mask2former.data import Mask2FormerDataModule
    from networks.mask2former.module import Mask2FormerModule

    ctx = RunContext(action="evaluate", run_dir=Path("."))
    module = Mask2FormerModule(cfg, ctx, model=model).to(dev).eval()
    dm = Mask2FormerDataModule(cfg, ctx)
    dm.setup("test")
    module.on_test_epoch_start()
    for i, batch in enumerate(dm.test_dataloader()):
        module.test_step(to_device(batch, dev), i)
    module.on_test_epoch_end()
    return dict(module.kpi)


def main() -> dict:
    """Run the comparison; returns (and writes) the result dict."""
    from benchmarks.common import device
    from networks.common.synthetic import generate
    from networks.mask2former.model import build_model
    from networks.mask2former.module import Mask2FormerModule

    minutes = float(os.environ.get("LEARN_MINUTES", "8"))
    num_train = int(os.environ.get("LEARN_NUM_TRAIN", "256"))
    num_val = int(os.environ.get("LEARN_NUM_VAL", "32"))
    if os.environ.get("LEARN_THREADS"):
        torch.set_num_threads(int(os.environ["LEARN_THREADS"]))
    dev = device()
    batch = 8
    results: dict[str, Any] = {
        "config": dict(SMALL, image_size=128, batch=batch, optimizer="AdamW lr 2e-4 wd 0.05, clip 0.1",
                       minutes_each=minutes, num_train=num_train, num_val=num_val, device=str(dev),
                       threads=torch.get_num_threads()),
    }
    with tempfile.TemporaryDirectory(prefix="learn_m2f_") as tmp:
        data = generate(Path(tmp) / "data", seed=0, num_train=num_train, num_val=num_val, image_size=128)
        hcfg = hf_config()
        cfg = our_spec(hcfg)
        point_at_data(cfg, data, batch)

        torch.manual_seed(0)
        ours = build_model(cfg.model).to(dev)
        module = Mask2FormerModule(cfg, None, model=ours).to(dev)
        print(f"ours: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f} M parameters; training "
              f"{minutes} min ...", flush=True)
        train = train_for(functools.partial(our_loss, module), ours, cfg, minutes * 60, dev)
        results["ours"] = {"train": train, "metrics": evaluate(ours, cfg, dev)}
        print("ours:", json.dumps(results["ours"]), flush=True)
        del module, ours

        torch.manual_seed(0)
        hf = build_hf_model(hcfg).to(dev)
        print(f"HF: {sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M parameters; training "
              f"{minutes} min ...", flush=True)
        train = train_for(functools.partial(hf_loss, hf), hf, cfg, minutes * 60, dev)
        results["hf"] = {"train": train, "metrics": evaluate(HFAsOurs(hf), cfg, dev)}
        print("HF:", json.dumps(results["hf"]), flush=True)

    rows = [("steps", "{:d}", lambda r: r["train"]["steps"]), ("seconds", "{:.0f}", lambda r: r["train"]["seconds"]),
            ("loss first10", "{:.2f}", lambda r: r["train"]["first_loss"]),
            ("loss last10", "{:.2f}", lambda r: r["train"]["last_loss"])]
    rows += [(k, "{:.3f}", lambda r, k=k: r["metrics"].get(k, float("nan"))) for k in METRICS]
    print(f"\n{'':14s}{'ours':>10s}{'HF':>10s}")
    for name, fmt, get in rows:
        print(f"{name:14s}{fmt.format(get(results['ours'])):>10s}{fmt.format(get(results['hf'])):>10s}")
    from networks.common.io import atomic_write_json

    atomic_write_json(RESULTS / "learn_mask2former.json", results, indent=2)
    print(f"results written to {RESULTS / 'learn_mask2former.json'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
