"""networks.ops.optim.fused_option: when the fused optimizer step is chosen, and that Lightning's mixed precision
with gradient clipping still trains with it (Lightning refuses clipping with an optimizer that unscales itself)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from networks.ops.optim import fused_option


def test_float_cpu_parameters_get_the_fused_step():
    p = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    assert fused_option(p) == {"fused": True}
    assert fused_option([{"params": p[:1]}, {"params": p[1:]}], "32-true") == {"fused": True}
    opt = torch.optim.AdamW(p, **fused_option(p))
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_gets_the_multi_tensor_step(precision):
    assert fused_option([torch.nn.Parameter(torch.randn(3))], precision) == {"foreach": True}


def test_non_float_or_empty_parameters_keep_the_default_step():
    assert fused_option([]) == {}
    assert fused_option([torch.zeros(3, dtype=torch.int64)]) == {}


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        params = list(self.parameters())
        return torch.optim.AdamW(params, lr=0.1, **fused_option(params, getattr(self._trainer, "precision", None)))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_with_gradient_clipping_runs_at_every_precision(tmp_path, precision):
    torch.manual_seed(0)
    model = _Tiny()
    before = model.lin.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, precision=precision, gradient_clip_val=0.1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4))
    assert not torch.equal(before, model.lin.weight.detach())
    step = trainer.optimizers[0].defaults
    assert (step.get("fused"), step.get("foreach")) == ((True, None) if precision == "32-true" else (None, True))
