"""Spec fields Mask Grounding DINO accepts but does not act on, with the reason: the ``unsupported`` and ``tao_ignored``
tables of its ``Network`` (rules in ``networks/common/network.py``; checked by ``tests/tao_cli/test_field_walk.py``)."""

from __future__ import annotations

UNSUPPORTED: dict[str, str] = {
    "model.pre_norm": "only post-norm layers exist (TAO asserts pre_norm is false too)",
    "dataset.dataset_type": "a memory layout of TAO's loader; tao-cli's loader has one layout",
    "train.optim.optimizer": "only AdamW is implemented (as in TAO)",
    "inference.is_internal": "TAO's internal folder layout is not implemented",
    "export.input_channel": "the model takes RGB images: the ONNX input always has 3 channels",
    "export.format": "only ONNX is written",
    "export.serialize_nvdsinfer": "DeepStream config files are not written",
}

TAO_IGNORED: dict[str, str] = {
    "dataset.augmentation.fixed_padding": "batches are always padded to their largest image (multiple of 32), never to a fixed canvas: false is what happens",
    "export.on_cpu": "export always runs on the CPU (the ONNX graph is the same on any device), so on_cpu: true is what happens",
    "export.gpu_id": "export always runs on the CPU; the ONNX graph does not depend on the device",
    "model_name": "informational; the network is the one named on the command line",
    "model.decoder_sa_type": "not read by TAO",
    "model.fix_refpoints_hw": "not read by TAO",
    "model.clip_max_norm": "not read by TAO (train.clip_grad_norm is used)",
    "model.dilation": "read but unused by TAO",
    "model.use_dn": "Mask Grounding DINO never builds denoising queries (as TAO)",
    "model.dn_number": "Mask Grounding DINO never builds denoising queries (as TAO)",
    "model.dn_box_noise_scale": "Mask Grounding DINO never builds denoising queries (as TAO)",
    "model.dn_label_noise_ratio": "Mask Grounding DINO never builds denoising queries (as TAO)",
    "model.has_mask": "TAO's scripts force it to true",
    "dataset.has_mask": "TAO's scripts force it to true",
    "dataset.eval_class_ids": "unused by TAO",
    "train.optim.momentum": "unused with AdamW",
    "evaluate.input_width": "unused by TAO's evaluate",
    "evaluate.input_height": "unused by TAO's evaluate",
}
