"""Spec fields Mask2Former accepts but does not act on, with the reason: the ``unsupported`` and ``tao_ignored``
tables of its ``Network`` (rules in ``networks/common/network.py``; checked by ``tests/tao_cli/test_field_walk.py``)."""

from __future__ import annotations

UNSUPPORTED: dict[str, str] = {
    "model.backbone.efficientvit": "the EfficientViT backbone is not implemented (model.backbone.type=efficientvit is refused)",
    "train.clip_grad_type": "only 'full' (one global L2 clip over all parameters) is implemented",
}

TAO_IGNORED: dict[str, str] = {
    "model.export": "the export action switches the model to its export form itself; true is refused for train, evaluate and inference",
    "export.on_cpu": "export always runs on the CPU (the ONNX graph is the same on any device), so on_cpu: true is what happens",
    "export.gpu_id": "export always runs on the CPU; the ONNX graph does not depend on the device",
    "model_name": "informational; the network is the one named on the command line",
    "model.backbone.swin.qk_scale": "TAO swallows it; the attention scale is always head_dim**-0.5",
    "model.backbone.swin.out_indices": "TAO does not pass it; all four stages are used",
    "dataset.train.name": "unused by TAO",
    "dataset.val.name": "unused by TAO",
    "dataset.test.name": "unused by TAO",
    "dataset.test.type": "inference reads only dataset.test.img_dir (as TAO)",
    "dataset.test.panoptic_json": "inference reads only dataset.test.img_dir (as TAO)",
    "dataset.test.instance_json": "inference reads only dataset.test.img_dir (as TAO)",
    "dataset.test.panoptic_dir": "inference reads only dataset.test.img_dir (as TAO)",
    "dataset.test.root_dir": "inference reads only dataset.test.img_dir (as TAO)",
    "dataset.test.annot_file": "inference reads only dataset.test.img_dir (as TAO)",
    "train.use_distributed_sampler": "unused by this network in TAO",
}
