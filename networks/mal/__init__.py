"""MAL (Mask Auto-Labeler): box-supervised instance masks from a ViT student/teacher pair.

The engine ↔ network contract (docs/architecture.md): names below are what ``tao_cli`` reads.  Heavy modules
(torch models, Lightning) are imported inside the builders so ``tao model mal --help`` stays fast.
"""
from __future__ import annotations

from typing import Any

from networks.common.network import Network, lazy
from networks.mal import unsupported as _fields
from networks.mal.config import ExperimentConfig, check

__all__ = ["NAME", "TITLE", "CHECKPOINT_NAME", "ACTIONS", "ExperimentConfig", "check", "main_kpi", "input_paths",
           "build_datamodule", "build_module", "NETWORK"]

NAME = "mal"
TITLE = "MAL"
CHECKPOINT_NAME = "mal_model"
ACTIONS = {
    "train": "Train MAL on COCO boxes (student/teacher ViT, MIL + CRF losses).",
    "evaluate": "Measure mask mIoU of a checkpoint against the validation set's ground-truth masks.",
    "inference": "Write pseudo-mask COCO JSON (and overlay PNGs) for every box of inference.ann_path.",
}


def main_kpi(cfg: Any) -> tuple[str, str]:
    """The validation metric that picks ``mal_model_best.pth``: class-averaged mask ``mIoU``, higher is better."""
    return "mIoU", "max"


def input_paths(cfg: Any, action: str) -> dict[str, str]:
    """``{dotted.key: path}`` of every annotation file, image directory/archive and weights file ``action`` reads.

    train: train and val annotations/images (validation runs during training) and ``train.pretrained_model_path``
    when set; evaluate: val annotations/images; inference: ``inference.ann_path``/``inference.img_dir``.
    Checkpoints named by ``<action>.checkpoint`` are the engine's business.
    """
    d = cfg.dataset
    if action == "train":
        paths = {
            "dataset.train_ann_path": d.train_ann_path,
            "dataset.train_img_dir": d.train_img_dir,
            "dataset.val_ann_path": d.val_ann_path,
            "dataset.val_img_dir": d.val_img_dir,
        }
        if cfg.train.pretrained_model_path:
            paths["train.pretrained_model_path"] = cfg.train.pretrained_model_path
        return paths
    if action == "evaluate":
        return {"dataset.val_ann_path": d.val_ann_path, "dataset.val_img_dir": d.val_img_dir}
    if action == "inference":
        return {"inference.ann_path": cfg.inference.ann_path, "inference.img_dir": cfg.inference.img_dir}
    return {}


def build_datamodule(cfg: Any, ctx: Any):
    """The :class:`~networks.mal.data.MALDataModule` for ``ctx.action`` (datasets are built in ``setup``)."""
    from networks.common.sources import resolve_dir
    from networks.mal.data import MALDataModule

    # Resolve image dirs/archives now, so a missing or unsafe archive fails before the Trainer exists (extraction
    # is cached and safe when several ranks arrive at once).
    for key, path in _image_dirs(cfg, getattr(ctx, "action", "train")).items():
        resolve_dir(path, field=key)
    return MALDataModule(cfg, ctx)


def _image_dirs(cfg: Any, action: str) -> dict:
    d = cfg.dataset
    if action == "train":
        return {"dataset.train_img_dir": d.train_img_dir, "dataset.val_img_dir": d.val_img_dir}
    if action == "evaluate":
        return {"dataset.val_img_dir": d.val_img_dir}
    if action == "inference":
        return {"inference.img_dir": cfg.inference.img_dir}
    return {}


#: The :class:`~networks.mal.module.MALModule` for ``ctx.action``.
build_module = lazy("networks.mal.module:MALModule")


NETWORK = Network(
    name=NAME, title=TITLE, checkpoint_name=CHECKPOINT_NAME, config_class=ExperimentConfig, actions=ACTIONS,
    check=check, input_paths=input_paths, build_module=build_module, build_datamodule=build_datamodule,
    main_kpi=main_kpi, sample_drawer=lazy("networks.mal.visualize:sample_drawer"),
    unsupported=_fields.UNSUPPORTED, tao_ignored=_fields.TAO_IGNORED,
    weight_formats=lazy("networks.mal.weight_formats:weight_formats"),
    # the LightningModule is the model: checkpoints hold student.* / teacher.*
    weights_prefix="",
    # TAO's default lr (1e-6, configs/mal/train.yaml) is meant for fine-tuning pretrained weights
    pretrained_fields=("train.pretrained_model_path",), random_init_lr=("train.lr", 1e-5),
)
