"""Prompts longer than the text window (chunked views merged per image) and the text cache.

The merge is checked against a brute-force reference written independently: every (view, query, class)
candidate scored on its own view's tokens, the global top-k, then per-class NMS.  The collator's chunks are checked
on a 300-name label map (each chunk fits, no name split, no class dropped), and the whole evaluate / inference
path runs on such a prompt.  The text cache must give the untouched model's outputs and never serve features of
weights that have changed since.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torchvision.ops import batched_nms

from networks.common.context import RunContext
from networks.mask_grounding_dino.chunking import chunk_names, merge_views, prompt_token_count
from networks.mask_grounding_dino.data import Collator, MaskGDinoDataModule
from networks.mask_grounding_dino.postprocess import postprocess
from networks.mask_grounding_dino.text_cache import TextCache

from .conftest import make_tiny_cfg

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore


def _names(n: int) -> list[str]:
    return [f"distractor thing number {i}" for i in range(n)]


def test_chunks_fit_cover_in_order_and_never_split_a_name(tokenizer):
    names = _names(120)
    names[7] = "an extraordinarily long multi word category name with many tokens"
    tokens = {n: len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names}
    ranges = chunk_names(names, tokens.__getitem__, 64)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(names)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False))
    for a, b in ranges:
        assert prompt_token_count([tokens[n] for n in names[a:b]]) <= 64
        if b < len(names):  # greedy: the next name would not have fitted
            assert prompt_token_count([tokens[n] for n in names[a:b + 1]]) > 64
    assert chunk_names(names[:3], tokens.__getitem__, 256) == [(0, 3)]
    assert chunk_names(["x" * 4000], lambda n: 300, 256) == [(0, 1)]  # alone in its chunk, cannot fit anyway


def _reference(logits, boxes, maps, k, nms):
    """Brute force: every (view, query, class) scored on its own view, top-k over all, then per-class NMS."""
    cands = []
    offset = 0
    for v in range(len(logits)):
        probs = logits[v].sigmoid()
        for c in range(maps[v].shape[0]):
            w = maps[v][c] / maps[v][c].sum()
            for q in range(probs.shape[0]):
                cands.append((float((probs[q] * w[:probs.shape[1]]).sum()), offset + c, boxes[v][q]))
        offset += maps[v].shape[0]
    cands.sort(key=lambda x: -x[0])
    cands = cands[:k]
    scores = torch.tensor([c[0] for c in cands])
    labels = torch.tensor([c[1] for c in cands])
    xyxy = torch.stack([torch.cat([c[2][:2] - c[2][2:] / 2, c[2][:2] + c[2][2:] / 2]) for c in cands]) * 100
    keep = batched_nms(xyxy, scores, labels, nms).sort().values
    return scores[keep], labels[keep]


def test_merged_views_equal_the_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    V, Q, L = 3, 12, 9
    logits = torch.randn(V, Q, L, generator=g) * 3
    boxes = torch.rand(V, Q, 4, generator=g) * 0.4 + 0.3
    maps = []
    for n in (3, 2, 4):  # classes per chunk, each on its own tokens of the chunk
        pm = torch.zeros(n, 16)
        for c in range(n):
            pm[c, 1 + 2 * c: 3 + 2 * c] = 1
        maps.append(pm)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "positive_map": m,
                "orig_size": (100, 100), "size": (100, 100)} for m in maps]
    batch = {"views": {"image_of_row": [0, 0, 0], "offsets": [0, 3, 5]}, "targets": targets,
             "names": [[f"a{i}" for i in range(3)], ["b0", "b1"], [f"c{i}" for i in range(4)]],
             "captions": ["a", "b", "c"], "image_ids": [7] * 3, "file_names": ["x.jpg"] * 3,
             "orig_sizes": [(100, 100)] * 3, "image_sizes": [(100, 100)] * 3,
             "input_ids": torch.arange(V * L).view(V, L), "attention_mask": torch.ones(V, L, dtype=torch.bool)}
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "text_token_mask": torch.ones(V, L, dtype=torch.bool)}
    merged, mb = merge_views(outputs, batch)
    assert mb["names"] == [["a0", "a1", "a2", "b0", "b1", "c0", "c1", "c2", "c3"]]
    assert mb["input_ids"][0].tolist() == list(range(V * L)) and mb["image_ids"] == [7]
    det = postprocess(merged, [t["positive_map"] for t in mb["targets"]], mb["image_sizes"], mb["orig_sizes"],
                      (100, 100), num_select=20, nms_threshold=0.5, with_masks=False)[0]
    ref_scores, ref_labels = _reference(logits, boxes, maps, 20, 0.5)
    assert det["labels"].tolist() == ref_labels.tolist()
    assert torch.allclose(det["scores"], ref_scores, atol=1e-6)
    assert len(set(det["labels"].tolist())) > 3  # candidates from more than one chunk survive


@pytest.fixture(scope="module")
def big_eval(mgd_synthetic, tmp_path_factory):
    """The val split with a 300-category COCO file: the 3 true classes at positions 20, 150 and 280."""
    va = mgd_synthetic["val"]
    doc = json.loads(Path(va["annotations"]).read_text())
    true = iter(doc["categories"])
    cats = [next(true) if i in (20, 150, 280) else {"id": 1000 + i, "name": n} for i, n in enumerate(_names(300))]
    path = tmp_path_factory.mktemp("big") / "big.json"
    path.write_text(json.dumps({**doc, "categories": cats}))
    return path, doc["categories"]


def test_collator_chunks_300_classes_without_dropping_one(mgd_synthetic, tiny_cfg, tokenizer, big_eval, caplog):
    path, true = big_eval
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dataset.test_data_sources = {"image_dir": str(mgd_synthetic["val"]["images"]), "json_file": str(path)}
    dm = MaskGDinoDataModule(cfg, RunContext("evaluate", Path(".")))
    dm.setup("test")
    samples = [dm.val_dataset[i] for i in range(2)]
    with caplog.at_level(logging.WARNING):
        batch = dm.eval_collate(samples)
    assert "cannot be detected" not in caplog.text
    rows, offsets = batch["views"]["image_of_row"], batch["views"]["offsets"]
    n_views = rows.count(0)
    assert n_views >= 3 and rows == [0] * n_views + [1] * n_views
    assert batch["input_ids"].shape[1] <= cfg.model.max_text_len
    for r, t in enumerate(batch["targets"]):
        assert (t["positive_map"].sum(-1) > 0).all()  # every class of every chunk has tokens in the window
        assert t["positive_map"].shape[0] == len(batch["names"][r]) == len(batch["category_ids"][r])
        assert (t["labels"] < len(batch["names"][r])).all()
    chunk_of = {}
    for r in range(n_views):
        for j, cid in enumerate(batch["category_ids"][r]):
            chunk_of[cid] = r
            assert batch["names"][r][j] == samples[0]["names"][offsets[r] + j]
    assert len({chunk_of[c["id"]] for c in true}) == 3  # the true classes sit in three different chunks
    gt = samples[0]["target"]["labels"]
    got = torch.cat([batch["targets"][r]["labels"] + offsets[r] for r in range(n_views)])
    assert sorted(got.tolist()) == sorted(gt.tolist())
    with pytest.raises(AssertionError):  # training collators do not chunk
        assert "views" in Collator(dm.tokenizer, cfg.model.max_text_len)(samples)


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def module(mgd_synthetic):
    from networks.mask_grounding_dino.module import MaskGDinoModule

    torch.manual_seed(0)
    return MaskGDinoModule(make_tiny_cfg(mgd_synthetic), None)


def test_evaluate_and_inference_on_a_300_class_prompt(module, mgd_synthetic, tiny_cfg, big_eval, tmp_path):
    path, true = big_eval
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dataset.test_data_sources = {"image_dir": str(mgd_synthetic["val"]["images"]), "json_file": str(path)}
    module.cfg, module.ctx = cfg, None
    _trainer().test(module, datamodule=MaskGDinoDataModule(cfg, RunContext("evaluate", Path("."))), verbose=False)
    assert {"bbox_val_mAP", "segm_val_mAP", "val_loss"} <= set(module.kpi)

    names = _names(300)
    names[20], names[150], names[280] = (c["name"] for c in true)
    cfg.dataset.infer_data_sources = {"image_dir": str(mgd_synthetic["val"]["images"]), "captions": names}
    cfg.inference.conf_threshold = 0.0
    module.ctx = RunContext("inference", tmp_path, log=logging.getLogger("test"))
    _trainer().predict(module, datamodule=MaskGDinoDataModule(cfg, module.ctx), return_predictions=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and all(r["category_name"] == names[r["category_id"]] for r in results)
    assert max(r["category_id"] for r in results) > 200  # detections come from late chunks too


def test_text_cache_serves_repeats_and_never_stale_features(module, tiny_cfg, mgd_synthetic):
    cfg = copy.deepcopy(tiny_cfg)
    dm = MaskGDinoDataModule(cfg, RunContext("evaluate", Path(".")))
    dm.setup("test")
    batch = dm.eval_collate([dm.val_dataset[i] for i in range(3)])
    model = module.model.eval()
    args = [batch[k] for k in ("input_ids", "attention_mask", "position_ids", "token_type_ids",
                               "text_self_attention_masks")]
    with torch.no_grad():
        model.text_cache = None
        plain = model(batch["images"], batch["pixel_mask"], *args)
        cache = TextCache(8)
        model.text_cache = cache
        first = model(batch["images"], batch["pixel_mask"], *args)
        assert (cache.hits, cache.misses) == (2, 1)  # three identical prompt rows: one encoding
        second = model(batch["images"], batch["pixel_mask"], *args)
        assert (cache.hits, cache.misses) == (5, 1)
        for out in (first, second):  # a miss encodes the whole batch, a hit reuses those very rows: equal bits
            assert torch.equal(out["pred_logits"], plain["pred_logits"])
            assert torch.equal(out["pred_boxes"], plain["pred_boxes"])
        saved = {k: v.clone() for k, v in model.bert.state_dict().items()}
        try:
            for p in model.bert.parameters():  # an in-place update, as an optimizer step makes
                p.mul_(1.01)
            changed = model(batch["images"], batch["pixel_mask"], *args)
            assert (cache.hits, cache.misses) == (7, 2)
            model.text_cache = None
            fresh = model(batch["images"], batch["pixel_mask"], *args)
            assert torch.allclose(changed["pred_logits"], fresh["pred_logits"], atol=1e-5)
            assert not torch.allclose(changed["pred_logits"], plain["pred_logits"], atol=1e-3)
        finally:
            model.bert.load_state_dict(saved)
            model.text_cache = None
    model.train()
    with torch.enable_grad():
        model.text_cache = cache
        model(batch["images"], batch["pixel_mask"], *args)
        assert (cache.hits, cache.misses) == (7, 2)  # training: the cache is not consulted
        model.text_cache = None


def test_text_cache_size_field_sizes_or_disables_the_cache(module, tiny_cfg):
    from networks.mask_grounding_dino.module import MaskGDinoModule

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.text_cache_size = 5
    sized = MaskGDinoModule(cfg, None, model=module.model)
    assert sized._text_cache.max_entries == 5
    sized.on_predict_epoch_start()
    assert module.model.text_cache is sized._text_cache  # attached for the pass ...
    sized._detach_text_cache()
    assert module.model.text_cache is None  # ... and gone before any training step
    cfg.model.text_cache_size = 0
    off = MaskGDinoModule(cfg, None, model=module.model)
    off.on_predict_epoch_start()
    assert off._text_cache is None and module.model.text_cache is None


def test_text_cache_is_bounded_least_recently_used_first_out():
    enc = torch.nn.Embedding(10, 3).eval()
    cache = TextCache(2)
    rows = {k: torch.tensor([[k, k + 1]]) for k in (1, 2, 3)}
    with torch.no_grad():
        for k in (1, 2, 1, 3):  # 2 is now the least recently used: evicted by 3
            ids = rows[k]
            assert torch.equal(cache.encode(enc, lambda ids=ids: enc(ids), ids), enc(ids))
        assert (cache.hits, cache.misses, len(cache._rows)) == (1, 3, 2)
        cache.encode(enc, lambda: enc(rows[1]), rows[1])
        cache.encode(enc, lambda: enc(rows[2]), rows[2])
    assert (cache.hits, cache.misses) == (2, 4)
