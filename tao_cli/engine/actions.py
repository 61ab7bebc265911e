"""The generic actions: train (fit), evaluate (test), inference (predict), and a network's extra actions.

Each takes the :class:`~tao_cli.engine.run.Run` being executed and returns the exit code (0); errors raise.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from networks.common.errors import CheckpointError
from networks.common.io import atomic_write_json
from networks.common.network import run_extra_action

from .devices import is_launch_rank_zero
from .signals import fit_mode_callback, interruptible

if TYPE_CHECKING:
    from .run import Run

__all__ = ["train", "evaluate", "infer", "extra", "load_into"]


def train(run: Run, module, datamodule) -> int:
    """``trainer.fit`` with periodic/latest/best checkpoints, status records and resume."""
    from .checkpoints import TaoCheckpoint, TaoCheckpointIO
    from .status import StatusCallback
    from .trainer import build_trainer

    plan, cfg, status, log = run.plan, run.cfg, run.status, run.log
    net, section = plan.net, cfg.train

    def on_best(info: dict) -> None:
        status.write("RUNNING", "New best checkpoint", epoch=info["epoch"], step=info["step"],
                     best_checkpoint=info)

    ckpt_cb = TaoCheckpoint(plan.run_dir, net.checkpoint_name,
                            interval=int(section.get("checkpoint_interval", 1)),
                            unit=str(section.get("checkpoint_interval_unit", "epoch")),
                            main_kpi=net.main_kpi(cfg), keep=int(section.get("keep_checkpoints", 0) or 0),
                            on_best=on_best)
    callbacks = [fit_mode_callback(run.signals), StatusCallback(status), ckpt_cb]
    trainer = build_trainer(cfg, "train", plan.devices, plan.run_dir, callbacks, module,
                            plugins=[TaoCheckpointIO(net.name, plan.key)])
    interruptible(trainer, run.signals, "Train", lambda: trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(plan.resume) if plan.resume else None), ckpt_cb)
    best = ckpt_cb.best_info()
    status.write("SUCCESS", "Train finished successfully.", **({"best_checkpoint": best} if best else {}))
    if best:
        log.info("Best checkpoint: %s (%s=%.4g, epoch %d/%d, step %d)", best["path"], best["kpi"], best["value"],
                 best["epoch"] + 1, int(section.num_epochs), best["step"])
    log.info("Train finished successfully. Results in %s", plan.run_dir)
    return 0


def load_into(module, checkpoint: Path, key: str | None, network: Any, *, model_cfg: Any = None,
              field: str = "checkpoint", log=None) -> dict:
    """Load ``checkpoint`` safely into ``module`` and return the checkpoint's non-weight entries (``epoch`` ...).
    ``network`` is the :class:`Network` (or its registry name) whose checkpoint tag and weight formats apply.

    * A tao-cli/TAO checkpoint (``tao_model`` tag) — and an untagged file whose keys and shapes are exactly the
      module's (``tao weights convert`` output) — loads as it is: every key must match by name and shape, a
      mismatch is one ``CheckpointError`` naming the first few keys of each kind (with both shapes).
    * Any other file or a directory is foreign weights: :func:`~networks.common.weight_formats.read_source`, the
      network's ``weight_formats`` detect the layout, and the converted tensors load under the network's
      ``weights_prefix`` with a report of matched / newly initialised / unexpected / mismatched counts (logged).
      A format that fills only a part (a backbone) is refused: ``field`` needs a whole model.  Weights another
      network recognises are refused in one line naming that network and ``network``.
    """
    import torch

    from networks.common.weight_formats import read_source, source_from_checkpoint
    from networks.common.weights import unwrap_state_dict

    from .checkpoints import load_checkpoint

    net = _network(network)
    network = net.name
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        obj: dict = {}
        src = read_source(checkpoint, field=field)
    else:
        obj = load_checkpoint(checkpoint, key=key, expected_network=network)
        record = obj.get("quantization")
        if isinstance(record, dict):  # the quantize action's PyTorch output: make its quantized layers first
            from networks.common.torch_quantize import prepare_quantized

            line = prepare_quantized(module, record, str(checkpoint))
            if log is not None:
                log.info("%s: %s", checkpoint, line)
        weights = {k: v for k, v in unwrap_state_dict(obj).items() if torch.is_tensor(v)}
        if _fits(module, weights):
            _load_own(module, weights, checkpoint)
            return obj
        src = source_from_checkpoint(checkpoint, obj,
                                     "safetensors" if checkpoint.suffix == ".safetensors" else "torch")
        # A tagged checkpoint in the network's own layout that does not fit is a spec/model mismatch: say which
        # keys.  A converted file (it may lack parts its source never had) or a tagged file in another layout of
        # the network (TAO 5 MAL's ConvStem) goes through its format, whose converter says what to set.
        if obj.get("tao_model") is not None and "converted_from" not in obj \
                and _own_layout(src, net):
            _load_own(module, weights, checkpoint)
            return obj
    report, fmt = _load_foreign(module, src, net, model_cfg, field)
    line = f"{checkpoint}: {fmt.network} weights in format '{fmt.name}' ({fmt.description}): {report.counts()}"
    if log is not None:
        log.info("%s", line)
        if report.missing:
            log.warning("%d tensors of the model are newly initialised (not in %s), e.g. %s", len(report.missing),
                        checkpoint.name, ", ".join(report.missing[:3]))
    return {k: v for k, v in src.meta.items() if k in ("epoch", "global_step")}


def _network(network: Any):
    """The :class:`Network` object for a registry name or the object itself (an unregistered test network)."""
    from tao_cli import registry

    return registry.load(network) if isinstance(network, str) else network


def _own_layout(src, net) -> bool:
    """True unless one of ``net``'s formats other than its own checkpoint layouts recognises ``src``."""
    from networks.common.weight_formats import OWN_LAYOUTS

    for fmt in net.weight_formats() if net.weight_formats is not None else []:
        try:
            if fmt.detect(src):
                return fmt.name in OWN_LAYOUTS
        except Exception:  # noqa: BLE001 - a detector must not decide by crashing
            continue
    return True


def _fits(module, weights: dict) -> bool:
    """True when ``weights`` has exactly the module's keys, with the same shapes."""
    own = module.state_dict()
    return set(weights) == set(own) and all(tuple(weights[k].shape) == tuple(own[k].shape) for k in own)


def _load_own(module, weights: dict, checkpoint: Path) -> None:
    from networks.common.weights import apply_state_dict

    report = apply_state_dict(module, weights, source=str(checkpoint), raise_on_mismatch=False, log_summary=False)
    if not report.clean:
        parts = []
        if report.mismatched:
            shapes = ", ".join(f"{k}: {tuple(f)} in the checkpoint vs {tuple(m)} in the model"
                               for k, f, m in report.mismatched[:3])
            parts.append(f"{len(report.mismatched)} shape mismatch(es) e.g. {shapes}")
        if report.missing:
            parts.append(f"{len(report.missing)} missing key(s) e.g. {report.missing[:3]}")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} unexpected key(s) e.g. {report.unexpected[:3]}")
        raise CheckpointError(str(checkpoint), "does not match the model: " + "; ".join(parts),
                              "check that the spec's model section matches the one used for training")


def _load_foreign(module, src, net, model_cfg: Any, field: str):
    """Detect ``src`` among ``net``'s formats and load it (see :func:`load_into`); ``(report, format)``."""
    from networks.common.weight_formats import detect_format, load_converted, require_whole_model
    from tao_cli.weights_cmd import detect_any

    network = net.name
    formats = list(net.weight_formats()) if net.weight_formats is not None else []
    try:
        if not formats:
            raise CheckpointError(str(src.path), f"is not a {network} checkpoint (no tao_model tag, and the keys "
                                  "are not the model's)", "pass a checkpoint trained by tao-cli or TAO")
        fmt = detect_format(src, formats, field=field)
    except CheckpointError:
        other = detect_any(src, exclude=network)
        if other:
            name, fmt = other
            raise CheckpointError(str(src.path), f"holds {name} weights ({fmt.name}: {fmt.description}), not "
                                  f"{network}", f"use weights of the {network} network for {field}") from None
        raise
    require_whole_model(fmt, src, field)
    return load_converted(module, src, fmt, model_cfg, prefix=net.weights_prefix), fmt


def _trainer_for(run: Run, module):
    from .checkpoints import TaoCheckpointIO
    from .trainer import build_trainer

    plan = run.plan
    obj: dict = {}
    try:
        if plan.checkpoint is not None:  # None: the module runs <action>.onnx_file itself
            obj = load_into(module, plan.checkpoint, plan.key, plan.net,
                            model_cfg=run.cfg.model if "model" in run.cfg else None,
                            field=f"{plan.action}.checkpoint", log=run.log)
    except RuntimeError as exc:  # shape mismatch from load_state_dict
        raise CheckpointError(str(plan.checkpoint),
                              f"does not match the model ({str(exc).splitlines()[0]})") from None
    trainer = build_trainer(run.cfg, plan.action, plan.devices, plan.run_dir, [], module,
                            plugins=[TaoCheckpointIO(plan.net.name, plan.key)])
    return obj, trainer


def evaluate(run: Run, module, datamodule) -> int:
    """Load ``evaluate.checkpoint``, ``trainer.test``; write ``metrics.json`` and a KPI status record."""
    obj, trainer = _trainer_for(run, module)
    epoch, step = obj.get("epoch"), obj.get("global_step")
    rank0 = trainer.is_global_zero and is_launch_rank_zero()
    interruptible(trainer, run.signals, "Evaluate",
                  lambda: trainer.test(module, datamodule=datamodule, verbose=False))
    # NaN/inf would make metrics.json invalid JSON: an undefined metric is null, as an empty size bin is.
    kpi = {k: _finite_or_none(_plain(v)) for k, v in dict(module.kpi or {}).items()}
    fields = {k: v for k, v in (("epoch", epoch), ("step", step)) if v is not None}
    if rank0:
        atomic_write_json(run.plan.run_dir / "metrics.json", kpi, indent=2)
    run.status.write("RUNNING", "Evaluation metrics generated.", kpi=kpi, **fields)
    for name, value in kpi.items():
        run.log.info("%s: %s", name, value)
    run.status.write("SUCCESS", "Evaluate finished successfully.")
    return 0


def infer(run: Run, module, datamodule) -> int:
    """Load ``inference.checkpoint``, ``trainer.predict``; the module writes its outputs, the summary is logged."""
    _, trainer = _trainer_for(run, module)
    interruptible(trainer, run.signals, "Inference",
                  lambda: trainer.predict(module, datamodule=datamodule, return_predictions=False))
    outputs = {k: _plain(v) for k, v in dict(module.outputs or {}).items()}
    for name, value in outputs.items():
        run.log.info("%s: %s", name, value)
    run.status.write("SUCCESS", "Inference finished successfully.", outputs=outputs)
    return 0


def extra(run: Run) -> int:
    """A network's own action (e.g. ``export``); its outputs go into the SUCCESS record."""
    outputs = run_extra_action(run.plan.net, run.plan.action, run.cfg, run.ctx)
    run.status.write("SUCCESS", f"{run.plan.action.capitalize()} finished successfully.", outputs=dict(outputs))
    return 0


def _finite_or_none(value: Any) -> Any:
    """``value``, except that a non-finite float becomes None (JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, Path):
        return str(value)
    return value
