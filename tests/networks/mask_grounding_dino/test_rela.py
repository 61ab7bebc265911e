"""ReLA region-query branch (reference §3.9, §4.6, §5.3, §6): model, losses on hand-made cases, post-processing
(no-target flag, IoI filter) and ONNX export with the two extra outputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from networks.mask_grounding_dino.criterion import (
    MaskGDinoCriterion,
    build_matcher,
    is_empty_target,
    loss_weights,
    union_targets,
)
from networks.mask_grounding_dino.postprocess import postprocess
from networks.mask_grounding_dino.rela import cpp_pooling, fg_bg_bce, find_grid, union_ioi_keep

REPO = Path(__file__).resolve().parents[3]
RELA_TERMS = ("loss_rela_nt", "loss_rela_minimap", "loss_rela_union_mask")


def _tiny_cfg(rela: bool = True, region_queries: int = 100):
    """configs/mask_grounding_dino/tiny.yaml (no data needed to build the model) with or without ``rela``."""
    from networks.mask_grounding_dino.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                          OmegaConf.load(REPO / "configs" / "mask_grounding_dino" / "tiny.yaml"))
    if rela:
        cfg.model.loss_types = ["labels", "boxes", "masks", "rela"]
    cfg.model.num_region_queries = region_queries
    return cfg


@pytest.fixture(scope="module")
def rela_module():
    from networks.mask_grounding_dino.module import MaskGDinoModule

    torch.manual_seed(0)
    return MaskGDinoModule(_tiny_cfg())


def _sample(image_id: int, size: tuple[int, int], names: list[str], boxes: list[list[float]],
            masks: list[torch.Tensor], empty: bool) -> dict:
    h, w = size
    g = torch.Generator().manual_seed(image_id)
    m = torch.stack(masks).to(torch.uint8) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
    return {"image": torch.randn(3, h, w, generator=g), "names": names, "image_id": image_id,
            "file_name": f"{image_id}.png",
            "target": {"labels": torch.zeros(len(boxes), dtype=torch.long),
                       "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "masks": m,
                       "size": (h, w), "orig_size": (h, w), "empty": empty}}


def _batch(tokenizer):
    """Two referring samples: "red square" with two targets (128×128) and "green circle" with none (96×128)."""
    from networks.mask_grounding_dino.data import Collator

    m1 = torch.zeros(128, 128)
    m1[16:48, 16:48] = 1
    m2 = torch.zeros(128, 128)
    m2[70:110, 60:120] = 1
    s1 = _sample(1, (128, 128), ["red square"], [[0.25, 0.25, 0.25, 0.25], [0.7, 0.7, 0.47, 0.31]], [m1, m2],
                 False)
    s2 = _sample(2, (96, 128), ["green circle"], [], [], True)
    return Collator(tokenizer, 256)([s1, s2])


# ---------------------------------------------------------------------------------------------- model + losses
def test_branch_built_only_with_rela_and_region_queries():
    from networks.mask_grounding_dino.config import check
    from networks.mask_grounding_dino.model import rela_queries

    assert rela_queries(_tiny_cfg(rela=False, region_queries=100).model) == 0  # TAO default 100 alone: no branch
    assert rela_queries(_tiny_cfg(rela=True, region_queries=100).model) == 100
    assert rela_queries(_tiny_cfg(rela=True, region_queries=7).model) == 7
    w = loss_weights(_tiny_cfg().model, 0)
    assert (w["loss_rela_nt"], w["loss_rela_minimap"], w["loss_rela_union_mask"]) == (1.0, 0.5, 2.0)
    assert not any(k.startswith("loss_rela") for k in loss_weights(_tiny_cfg(rela=False).model, 0))
    check(_tiny_cfg(), "train")  # no longer refused


def test_forward_backward_with_rela_on_tiny_config(rela_module, tokenizer):
    module = rela_module
    model = module.model
    assert model.rela is not None and model.rela.query_feat.weight.shape == (100, 64)
    module.train()
    batch = _batch(tokenizer)
    seen = []  # memory [h·w, B, d] given to each masked cross-attention layer
    hooks = [layer.register_forward_hook(lambda mod, args, res: seen.append(args[1].shape))
             for layer in model.rela.cross_attention_layers]
    try:
        out = module(batch, match=True)
    finally:
        for h in hooks:
            h.remove()
    B, H, W = 2, 128, 128
    assert out["no_targets"].shape == (B, 2)
    assert out["union_mask_logits"].shape == (B, 2, H // 8, W // 8)
    assert out["minimaps"].shape == (B, 100, 2)
    assert len(out["rela_layers"]) == 3  # dec_layers of the tiny config
    # the no-target image got no Hungarian match, so no instance masks
    assert out["mask_indices"][1][0].numel() == 0 and out["pred_masks"][1].shape[0] == 0
    losses = module.criterion(out, batch["targets"], batch["attention_mask"])
    for k in RELA_TERMS:
        assert k in losses and torch.isfinite(losses[k]) and float(losses[k].detach()) > 0, k
    assert all(torch.isfinite(v) for v in losses.values())
    total = module.weighted_loss(losses)
    rela_part = sum(module.loss_weights[k] * losses[k] for k in RELA_TERMS)
    rest = module.weighted_loss({k: v for k, v in losses.items() if k not in RELA_TERMS})
    assert torch.allclose(total, rest + rela_part)
    assert [tuple(m) for m in seen] == [(16, 2, 64), (64, 2, 64), (256, 2, 64)]  # strides 32, 16, 8 in turn
    qf, qe = model.rela.query_feat.weight, model.rela.query_embed.weight
    for k in RELA_TERMS:  # every ReLA term reaches the region queries
        g_feat, g_pos = torch.autograd.grad(losses[k], (qf, qe), retain_graph=True)
        assert torch.isfinite(g_feat).all() and g_feat.abs().sum() > 0, k
        assert g_pos.abs().sum() > 0, k
    model.zero_grad(set_to_none=True)
    total.backward()
    assert model.rela.lang_weight.grad is not None and model.rela.lang_weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_mask_from_previous_region_masks():
    from networks.mask_grounding_dino.rela import RelaBranch

    branch = RelaBranch(8, 3, 2, 16, 1)
    rm = torch.full((1, 3, 4, 4), -5.0)
    rm[0, 0, :, :2] = 5.0   # query 0: left half
    rm[0, 2] = 5.0          # query 2: everywhere (query 1: nowhere)
    pad = torch.zeros(1, 4, 4, dtype=torch.bool)
    pad[0, :, 3] = True     # last column is padding
    m = branch._attn_mask(rm, (4, 4), pad)
    assert m.shape == (2, 3, 16)  # [B·heads, Q, h·w]
    assert torch.equal(m[0], m[1])  # same mask for both heads of the image
    blocked = m[0].view(3, 4, 4)
    assert not blocked[0, :, :2].any() and blocked[0, :, 2:].all()
    assert torch.equal(blocked[1], pad[0])  # blocked everywhere → sees the whole valid level
    assert torch.equal(blocked[2], pad[0])  # padding is never attended


# ---------------------------------------------------------------------------------------- loss pieces
def test_cpp_pooling_fractions_and_resize():
    m = torch.tensor([[1, 1, 0, 0],
                      [1, 0, 0, 0],
                      [0, 0, 1, 1],
                      [0, 0, 1, 1]], dtype=torch.float32)[None]
    p = cpp_pooling(m, (2, 2))
    assert p.shape == (1, 2, 2, 2)
    assert torch.allclose(p[0, 1], torch.tensor([[0.75, 0.0], [0.0, 1.0]]))  # foreground fraction per cell
    assert torch.allclose(p[0, 0], 1 - p[0, 1])  # channel 0 = background
    # 3×3 → (2, 2): nearest-resized to 4×4 first (source rows/cols 0, 0, 1, 2)
    m3 = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float32)[None]
    p3 = cpp_pooling(m3, (2, 2))[0, 1]
    assert torch.allclose(p3, torch.tensor([[0.0, 0.5], [0.0, 0.25]]))
    # a non-square grid keeps rows × cols order
    assert cpp_pooling(torch.ones(1, 8, 4), (4, 2)).shape == (1, 2, 4, 2)


def test_find_grid_picks_the_factor_pair_closest_to_the_aspect():
    assert find_grid(100, 128, 128) == (10, 10)
    assert find_grid(100, 100, 400) == (5, 20)  # wide image: few rows
    assert find_grid(100, 400, 100) == (20, 5)
    assert find_grid(12, 30, 40) == (3, 4)
    assert find_grid(7, 10, 10) == (1, 7)  # prime: tie broken towards fewer rows


def test_no_target_loss_targets_the_empty_image_with_class_weights():
    crit = MaskGDinoCriterion(build_matcher(_tiny_cfg().model), losses=["labels", "boxes", "masks", "rela"])
    full = torch.zeros(1, 16, 16)
    full[0, :8, :8] = 1
    targets = [{"labels": torch.tensor([0]), "masks": full, "size": (16, 16)},           # has a target
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16), "size": (16, 16)},
               {"labels": torch.tensor([0]), "masks": full, "size": (16, 16), "empty": True}]  # flag wins
    assert [is_empty_target(t) for t in targets] == [False, True, True]
    nt = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    outputs = {"no_targets": nt, "union_mask_logits": torch.zeros(3, 2, 2, 2), "minimaps": torch.zeros(3, 4, 2)}
    got = crit.loss_rela(outputs, targets)["loss_rela_nt"]
    ls = -F.log_softmax(nt, -1)
    expected = (0.9 * ls[0, 0] + 1.1 * ls[1, 1] + 1.1 * ls[2, 1]) / (0.9 + 1.1 + 1.1)
    assert torch.allclose(got, expected)


def test_union_and_minimap_losses_on_hand_made_masks():
    crit = MaskGDinoCriterion(build_matcher(_tiny_cfg().model), losses=["rela"])
    m = torch.zeros(2, 16, 16)
    m[0, :8, :] = 1          # top half (two instances)
    m[1, :8, :4] = 1
    targets = [{"labels": torch.tensor([0, 0]), "masks": m, "size": (16, 8)},  # right half of the canvas padded
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16), "size": (16, 16),
                "empty": True}]
    union, valid = union_targets(targets, "cpu")
    assert torch.equal(union[0], m[0]) and union[1].sum() == 0
    assert valid[0, :, :8].all() and valid[0, :, 8:].sum() == 0 and valid[1].all()
    # union logits: perfect (±20) on the valid cells of image 0 and all of image 1
    target_cells = cpp_pooling(union, (2, 2))
    good = (target_cells * 2 - 1) * 20.0
    # minimap: 4 region queries on a 2×2 grid, row-major; image 0's top row is foreground
    mm_good = torch.tensor([[[-20.0, 20.0], [-20.0, 20.0], [20.0, -20.0], [20.0, -20.0]],
                            [[20.0, -20.0]] * 4])
    out = {"no_targets": torch.zeros(2, 2), "union_mask_logits": good.clone(), "minimaps": mm_good}
    losses = crit.loss_rela(out, targets)
    assert losses["loss_rela_union_mask"] < 1e-6 and losses["loss_rela_minimap"] < 1e-6
    # garbage in the padded cells (right column of image 0) costs nothing: those cells have weight 0
    bad_pad = good.clone()
    bad_pad[0, :, :, 1] = -bad_pad[0, :, :, 1]
    assert crit.loss_rela({**out, "union_mask_logits": bad_pad}, targets)["loss_rela_union_mask"] < 1e-6
    # ... but a wrong valid cell does, weighted 0.9 (background channel) + 1.1 (foreground channel)
    bad = good.clone()
    bad[0, :, 0, 0] = -bad[0, :, 0, 0]
    got = crit.loss_rela({**out, "union_mask_logits": bad}, targets)["loss_rela_union_mask"]
    per = F.binary_cross_entropy_with_logits(torch.tensor(20.0), torch.tensor(0.0))
    assert torch.allclose(got, (0.9 + 1.1) * per / 8, rtol=1e-4)  # 1 wrong cell of 8 per channel
    assert torch.allclose(got, fg_bg_bce(bad, target_cells, cpp_pooling(valid, (2, 2))[:, 1]))
    bad_fg = good.clone()
    bad_fg[0, 1, 0, 0] = -bad_fg[0, 1, 0, 0]  # only the foreground channel wrong: weight 1.1
    got_fg = crit.loss_rela({**out, "union_mask_logits": bad_fg}, targets)["loss_rela_union_mask"]
    assert torch.allclose(got_fg, 1.1 * per / 8, rtol=1e-4)
    # column-major query layout (query 1 = bottom-left) is wrong
    mm_colmajor = mm_good.clone()
    mm_colmajor[0] = mm_good[0][[0, 2, 1, 3]]
    assert crit.loss_rela({**out, "minimaps": mm_colmajor}, targets)["loss_rela_minimap"] > 1.0


# ---------------------------------------------------------------------------------------- post-processing
def _ioi_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Union: left half of a 4×4 map (stride 8) → columns 0..4 of the 8×8 stride-4 map after bilinear + "> 0".
    Instances at stride 4: 0 = columns 0-2 (IoI 1), 1 = columns 6-7 (IoI 0), 2 = columns 2-5 (IoI 3/4), 3 = empty."""
    union = torch.zeros(2, 4, 4)
    union[1, :, :2] = 5.0
    union[0, :, 2:] = 5.0
    inst = torch.full((4, 8, 8), -5.0)
    inst[0, :, 0:3] = 5.0
    inst[1, :, 6:8] = 5.0
    inst[2, :, 2:6] = 5.0
    return inst, union


def test_ioi_filter_keeps_masks_inside_the_union():
    inst, union = _ioi_masks()
    assert union_ioi_keep(inst, union, 0.5).tolist() == [True, False, True, False]
    assert union_ioi_keep(inst, union, 0.8).tolist() == [True, False, False, False]  # IoU would drop inst 0 too
    assert union_ioi_keep(inst, union, 0.0).tolist() == [True] * 4  # 0 disables


def test_postprocess_no_target_flag_and_ioi_filter():
    inst, union = _ioi_masks()
    Q, T = 4, 8
    logits = torch.full((2, Q, T), -10.0)
    logits[:, :, 1] = torch.tensor([3.0, 2.0, 1.0, 0.5])  # token 1 = the expression; distinct scores
    boxes = torch.tensor([[0.2, 0.5, 0.3, 0.9], [0.85, 0.5, 0.2, 0.9], [0.3, 0.5, 0.3, 0.9], [0.5, 0.5, 0.1, 0.1]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes[None].repeat(2, 1, 1),
               "pred_masks": inst[None, :, None].repeat(2, 1, 1, 1, 1),
               "no_targets": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # image 0: no target
               "union_mask_logits": union[None].repeat(2, 1, 1, 1)}
    pos = torch.zeros(1, T)
    pos[0, 1] = 1
    kw = dict(pos_maps=[pos, pos], image_sizes=[(32, 32)] * 2, orig_sizes=[(64, 64)] * 2, padded_hw=(32, 32),
              num_select=4)
    dets = postprocess(outputs, ioi_threshold=0.5, **kw)
    assert bool(dets[0]["no_target"]) and dets[0]["scores"].numel() == 0 and dets[0]["masks"].shape == (0, 64, 64)
    assert not bool(dets[1]["no_target"])
    assert dets[1]["queries"].tolist() == [0, 2]
    assert dets[1]["masks"].shape == (2, 64, 64) and dets[1]["boxes"].shape == (2, 4)
    # ioi 0 disables the filter; the no-target image stays empty
    dets0 = postprocess(outputs, ioi_threshold=0.0, **kw)
    assert dets0[1]["queries"].tolist() == [0, 1, 2, 3] and dets0[0]["scores"].numel() == 0
    # NMS still applies after the IoI filter (queries 0 and 2 overlap heavily at a low threshold)
    dets_nms = postprocess(outputs, ioi_threshold=0.5, nms_threshold=0.1, **kw)
    assert dets_nms[1]["queries"].tolist() == [0]
    # a model without the branch: nothing changes
    plain = {k: v for k, v in outputs.items() if k not in ("no_targets", "union_mask_logits")}
    assert postprocess(plain, ioi_threshold=0.5, **kw)[0]["queries"].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------- ONNX
def test_onnx_export_with_rela_outputs_and_parity(tmp_path, tokenizer):
    import onnx
    import onnxruntime as ort

    from networks.mask_grounding_dino.export import (
        INPUT_NAMES,
        OUTPUT_NAMES,
        ExportWrapper,
        _example,
        export_onnx,
        onnx_parity,
        output_names,
    )
    from networks.mask_grounding_dino.model import build_model

    torch.manual_seed(0)
    model = build_model(_tiny_cfg(region_queries=20)).eval()
    names = output_names(model)
    assert names == OUTPUT_NAMES + ["no_targets", "union_mask_logits"]
    path = export_onnx(model, tokenizer, tmp_path / "rela.onnx", (128, 128), 256, batch_size=-1)
    m = onnx.load(str(path))
    assert [o.name for o in m.graph.output] == names
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    ex = _example(tokenizer, 2, (128, 128), 256, seed=1, captions=["the red square .", "a green circle ."])
    with torch.no_grad():
        ref = [t.numpy() for t in ExportWrapper(model)(*ex)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(names, sess.run(names, {n: t.numpy() for n, t in zip(INPUT_NAMES, ex, strict=True)}),
                   strict=True))
    assert got["no_targets"].shape == (2, 2) and got["union_mask_logits"].shape == (2, 2, 16, 16)
    for i, k in enumerate(names[3:], start=3):
        scale = max(1.0, float(np.abs(ref[i]).max()))
        assert np.abs(got[k] - ref[i]).max() <= 1e-4 * scale, k
    assert np.abs(got["no_targets"] - ref[3]).max() <= 1e-4
    diffs = onnx_parity(model, path, ex)
    assert set(diffs) == set(names)
    assert math.isfinite(diffs["union_mask_logits"])
