"""Spec fields MAL accepts but does not act on, with the reason: the ``unsupported`` and ``tao_ignored``
tables of its ``Network`` (rules in ``networks/common/network.py``; checked by ``tests/tao_cli/test_field_walk.py``)."""

from __future__ import annotations

UNSUPPORTED: dict[str, str] = {
}

TAO_IGNORED: dict[str, str] = {
    "evaluate.comp_clustering": "TAO never computes the clustering score it names (val/cluster_score is never updated)",
    "model_name": "informational; the network is the one named on the command line",
    "train.optim_momentum": "stored but unused: the optimizer is AdamW",
}
