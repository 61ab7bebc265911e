"""Mixed precision: one bf16-autocast training step per network on CPU (``torch.autocast("cpu", bfloat16)``).

Each test runs the module's ``training_step`` on one tiny batch twice from the same seed — plain fp32, then under
bf16 autocast — and backpropagates.  Under autocast the loss must be finite and close to the fp32 loss (bf16
keeps ~3 significant digits, so the tolerance is loose), every gradient finite, and the code that is meant to
stay in float32 whatever the training precision must really run in float32 with autocast off:

* the Hungarian matcher's cost terms (``networks/ops/matcher.py``; Mask2Former, Mask Grounding DINO);
* the deformable-attention sampling (``networks/ops/ms_deform_attn.py``: values, locations and weights are
  upcast before ``ms_deform_attn_core``, whose output is then float32 too);
* Mask Grounding DINO's decoder FFN (``DecoderLayer``: its Linears run with autocast off, in float32);
* Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``: float32 features, autocast off, float32 outputs);
* MAL's mean-field refinement (``MeanField.refine``: autocast off, float32 state even for bf16 inputs).

A spy also checks that autocast was really on (some Linear produced bf16), so the checks are not vacuous.
"""
from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import networks.ops.ms_deform_attn as msda
from networks.common.context import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16




@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from networks.common.synthetic import generate

    return generate(tmp_path_factory.mktemp("autocast_synth"), seed=0, num_train=4, num_val=2, image_size=96)


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


class _Spy:
    """Records (autocast on?, dtypes) of calls in the current phase (``phase`` = "fp32" or "bf16")."""

    def __init__(self):
        self.phase = "fp32"
        self.calls: dict[str, list[tuple[str, bool, tuple]]] = {}

    def record(self, name: str, *tensors) -> None:
        dtypes = tuple(t.dtype for t in tensors)
        self.calls.setdefault(name, []).append((self.phase, _autocast_on(), dtypes))

    def bf16_calls(self, name: str) -> list[tuple[bool, tuple]]:
        calls = [(on, d) for phase, on, d in self.calls.get(name, []) if phase == "bf16"]
        assert calls, f"{name} was never called in the bf16 step"
        return calls


def _watch_deform_attn(monkeypatch, spy: _Spy) -> None:
    real = msda.ms_deform_attn_core

    def core(value, shapes, loc, weights):
        out = real(value, shapes, loc, weights)
        spy.record("ms_deform_attn_core", value, loc, weights, out)
        return out

    monkeypatch.setattr(msda, "ms_deform_attn_core", core)


def _watch_matcher(matcher, spy: _Spy) -> None:
    def wrap(name, fn):
        def cost(pred, target, cache):
            out = fn(pred, target, cache)
            spy.record(f"cost:{name}", out)
            return out
        return cost

    matcher.cost_terms = {name: (w, wrap(name, fn)) for name, (w, fn) in matcher.cost_terms.items()}


def _watch_module_output(module: torch.nn.Module, name: str, spy: _Spy) -> None:
    module.register_forward_hook(lambda m, args, out: spy.record(name, out))


def _step(module, batch, spy: _Spy, *, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded training step (+ backward) → (loss, {param name: grad})."""
    spy.phase = "bf16" if bf16 else "fp32"
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns once per call
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _check_losses_and_grads(loss32, grads32, loss16, grads16, rel: float) -> None:
    assert torch.isfinite(loss32) and loss32.item() > 0
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16), loss16
    assert abs(loss16.item() - loss32.item()) <= rel * abs(loss32.item()), (loss16.item(), loss32.item())
    assert set(grads16) == set(grads32) and len(grads16) > 10
    bad = [n for n, g in grads16.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients under bf16 autocast: {bad[:5]}"
    assert sum(bool(g.abs().sum() > 0) for g in grads16.values()) > len(grads16) // 2


def _check_float32(spy: _Spy, name: str, *, autocast_off: bool) -> None:
    """Every bf16-step call of ``name`` saw float32 tensors only (and ran with autocast off if asked)."""
    for on, dtypes in spy.bf16_calls(name):
        assert not (autocast_off and on), f"{name} ran with autocast on"
        assert all(d == torch.float32 for d in dtypes), f"{name} saw {dtypes} under bf16 autocast"


# ----------------------------------------------------------------------------------------------- networks
def test_mask_grounding_dino_bf16_training_step(synthetic, tmp_path, monkeypatch):
    from networks.mask_grounding_dino.data import MaskGDinoDataModule
    from networks.mask_grounding_dino.module import MaskGDinoModule

    from .mask_grounding_dino.conftest import make_tiny_cfg

    cfg = make_tiny_cfg(synthetic)
    cfg.dataset.batch_size = 2
    torch.manual_seed(0)
    module = MaskGDinoModule(cfg, None)
    dm = MaskGDinoDataModule(cfg, RunContext("train", tmp_path, log=logging.getLogger("test")))
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))

    spy = _Spy()
    _watch_deform_attn(monkeypatch, spy)
    _watch_matcher(module.criterion.matcher, spy)
    for layer in module.model.transformer.decoder.layers:
        _watch_module_output(layer.linear1, "decoder_ffn", spy)
        _watch_module_output(layer.linear2, "decoder_ffn", spy)
        _watch_module_output(layer, "decoder_layer", spy)
    _watch_module_output(module.model.feat_map, "feat_map (a Linear)", spy)

    loss32, grads32 = _step(module, batch, spy, bf16=False)
    loss16, grads16 = _step(module, batch, spy, bf16=True)

    assert all(d == (BF16,) for _, d in spy.bf16_calls("feat_map (a Linear)"))  # autocast was on
    _check_losses_and_grads(loss32, grads32, loss16, grads16, rel=0.05)
    _check_float32(spy, "ms_deform_attn_core", autocast_off=False)  # grid_sample keeps fp32 inputs fp32
    for term in ("class", "bbox", "giou"):
        _check_float32(spy, f"cost:{term}", autocast_off=True)
    # the decoder FFN runs in float32 with autocast off (its Linears give float32, not bf16), so does the output
    _check_float32(spy, "decoder_ffn", autocast_off=True)
    _check_float32(spy, "decoder_layer", autocast_off=False)


def test_mask2former_bf16_training_step(synthetic, tmp_path, monkeypatch):
    from networks.mask2former.data import Mask2FormerDataModule
    from networks.mask2former.module import Mask2FormerModule

    from .mask2former.conftest import make_tiny_cfg

    cfg = make_tiny_cfg(synthetic)
    cfg.model.mask_former.train_num_points = 256
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg, RunContext("train", tmp_path / "train"))
    dm = Mask2FormerDataModule(cfg, RunContext("train", tmp_path))
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))

    spy = _Spy()
    _watch_deform_attn(monkeypatch, spy)
    _watch_matcher(module.criterion.matcher, spy)
    linear = next(m for m in module.model.modules() if isinstance(m, torch.nn.Linear))
    _watch_module_output(linear, "a Linear", spy)
    module.model.sem_seg_head.pixel_decoder.register_forward_hook(
        lambda m, args, out: spy.record("pixel_decoder", out[0], out[1], *out[2]))

    loss32, grads32 = _step(module, batch, spy, bf16=False)
    loss16, grads16 = _step(module, batch, spy, bf16=True)

    assert all(d == (BF16,) for _, d in spy.bf16_calls("a Linear"))
    _check_losses_and_grads(loss32, grads32, loss16, grads16, rel=0.05)
    _check_float32(spy, "ms_deform_attn_core", autocast_off=False)  # grid_sample keeps fp32 inputs fp32
    # the pixel decoder runs in float32 (features cast, autocast off), as TAO's @autocast(enabled=False)
    _check_float32(spy, "pixel_decoder", autocast_off=False)
    for term in ("class", "mask", "dice"):
        _check_float32(spy, f"cost:{term}", autocast_off=True)


def _mal_module(tmp_path: Path):
    from networks.mal.config import ExperimentConfig
    from networks.mal.module import MALModule

    cfg = OmegaConf.structured(ExperimentConfig)
    over = {"model.arch": "vit-deit-tiny/16", "model.mask_head_hidden_channel": 16,
            "model.mask_head_out_channel": 16, "train.crf_num_iter": 5, "train.batch_size": 2,
            # no warm-up ramp: at step 0 both loss weights would otherwise be 0
            "train.loss_mil_step": 0, "train.loss_crf_step": 0}
    for key, value in over.items():
        OmegaConf.update(cfg, key, value)
    torch.manual_seed(0)
    return MALModule(cfg, RunContext("train", tmp_path))


def _mal_batch(side: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, side, side)
    mask[0, :, 8:40, 10:30] = 1
    mask[1, :, 20:60, 4:50] = 1
    image = torch.randn(2, 3, side, side, generator=g)
    image[:, :, 8:40, 10:30] += 1.5  # an object the mean field can separate
    return {"image": image, "timage": image + 0.05 * torch.randn(2, 3, side, side, generator=g), "mask": mask,
            "bbox": torch.tensor([[5.0, 5.0, 45.0, 60.0], [0.0, 10.0, 80.0, 90.0]]),
            "compact_category_id": torch.tensor([1, 1]), "ann_id": torch.tensor([0, 1])}


def test_mal_bf16_training_step(tmp_path, monkeypatch):
    module = _mal_module(tmp_path)
    batch = _mal_batch()
    spy = _Spy()
    mf = module.mean_field
    real_affinity = mf.affinity

    def affinity(image):
        out = real_affinity(image)
        spy.record("mean_field", image, out)
        return out

    monkeypatch.setattr(mf, "affinity", affinity)
    linear = next(m for m in module.student.modules() if isinstance(m, torch.nn.Linear))
    _watch_module_output(linear, "a Linear", spy)

    loss32, grads32 = _step(module, batch, spy, bf16=False)
    loss16, grads16 = _step(module, batch, spy, bf16=True)

    assert all(d == (BF16,) for _, d in spy.bf16_calls("a Linear"))
    _check_losses_and_grads(loss32, grads32, loss16, grads16, rel=0.05)
    _check_float32(spy, "mean_field", autocast_off=True)


def test_mal_mean_field_state_is_float32_for_bf16_inputs(tmp_path):
    """``MeanField.refine`` called under autocast with bf16 inputs iterates in float32: it returns float32 and
    the same state as for the same values given in float32."""
    from networks.mal.criterion import MeanField

    torch.manual_seed(0)
    image = torch.randn(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] += 2.0
    init = torch.rand(1, 16, 16)
    box = torch.zeros(1, 16, 16)
    box[:, 3:13, 3:13] = 1
    mf = MeanField(kernel_size=3, zeta=0.5, num_iter=20)
    image16, init16 = image.to(BF16), init.to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        state = mf.refine(image16, init16, box.to(BF16))
    assert state.dtype == torch.float32
    reference = mf.refine(image16.float(), init16.float(), box)
    torch.testing.assert_close(state, reference, rtol=0, atol=1e-6)
    assert 0.1 <= state.min() and state.max() <= 0.9 and state.std() > 0.05
