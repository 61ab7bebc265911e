"""Device plan: turn ``num_gpus`` / ``gpu_ids`` / ``num_nodes`` and the environment into Trainer settings.

TAO's reconciliation rule is kept (``num_gpus = max(num_gpus, len(gpu_ids))``; the ids are regenerated as
``range(num_gpus)`` unless the list length wins), but every change to what the user wrote is reported as a
warning, requested ids are checked against the visible CUDA devices, and a bad multi-node environment is a
``ConfigError`` instead of TAO's silent single-node fallback.

Environment contract (TAO's): ``WORLD_SIZE`` = number of nodes, ``NODE_RANK`` (or ``RANK``) = this node,
``MASTER_ADDR`` / ``MASTER_PORT`` = rendezvous, ``NUM_GPU_PER_NODE`` = processes per node.  Under Slurm
(``srun``), Lightning's ``SLURMEnvironment`` reads ranks itself; we only take the node count from it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from networks.common.errors import ConfigError

__all__ = ["DevicePlan", "plan_devices", "plan_for_action", "is_launch_rank_zero", "DEVICE_ACTIONS", "PLAN_ENV"]

#: Actions that honour ``<action>.num_gpus`` / ``gpu_ids`` / ``num_nodes``; every other action uses one device.
DEVICE_ACTIONS = ("train", "evaluate", "inference")

#: Environment variable through which rank 0 hands its plan to the worker processes Lightning starts
#: (those inherit an environment where ``WORLD_SIZE`` means processes, not nodes).
PLAN_ENV = "TAO_CLI_DEVICE_PLAN"


@dataclass
class DevicePlan:
    """What the Trainer will run on.

    ``accelerator`` is ``"gpu"`` or ``"cpu"``; ``devices`` is the list of physical GPU ids (GPU) or the number
    of processes (CPU); ``num_nodes`` the node count; ``gpu_ids`` the reconciled ids (empty on CPU);
    ``world_size`` = processes per node x nodes; ``warnings`` the adjustments made to the user's values;
    ``slurm`` is true when Slurm started the processes.
    """

    accelerator: str
    devices: int | list[int]
    num_nodes: int
    gpu_ids: list[int]
    world_size: int
    warnings: list[str] = field(default_factory=list)
    slurm: bool = False

    @property
    def processes_per_node(self) -> int:
        """Number of processes on each node."""
        return len(self.devices) if isinstance(self.devices, list) else int(self.devices)

    def describe(self) -> str:
        """One line for logs and ``--dry-run``."""
        where = f"GPUs {self.devices}" if self.accelerator == "gpu" else f"{self.devices} CPU process(es)"
        text = f"accelerator={self.accelerator}, devices={where}, num_nodes={self.num_nodes}, world_size={self.world_size}"
        if self.slurm:
            text += " (processes started by Slurm)"
        return text

    def to_json(self) -> str:
        """Serialise for :data:`PLAN_ENV`."""
        return json.dumps(asdict(self))


def _int_env(env: Mapping[str, str], name: str, *, low: int | None = None, high: int | None = None,
             what: str = "") -> int:
    raw = env.get(name, "")
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"environment {name}", f"{raw!r} is not an integer", what or None) from None
    if low is not None and value < low or high is not None and value > high:
        rng = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise ConfigError(f"environment {name}", f"{value} is outside {rng}", what or None)
    return value


def _slurm_detected(env: Mapping[str, str]) -> bool:
    # Same rule as Lightning's SLURMEnvironment.detect(), evaluated on the given mapping.
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_devices(
    num_gpus: int,
    gpu_ids: list[int] | None,
    num_nodes: int = 1,
    env: Mapping[str, str] | None = None,
    cuda_count: int | None = None,
) -> DevicePlan:
    """Reconcile the spec's device fields with the environment and return a :class:`DevicePlan`.

    ``cuda_count`` defaults to the number of visible CUDA devices (0 → CPU: ``num_gpus=N`` then means N CPU
    processes over gloo).  Raises ``ConfigError`` for ids that are not visible, a malformed multi-node
    environment, or non-positive counts.
    """
    env = os.environ if env is None else env
    if PLAN_ENV in env and "LOCAL_RANK" in env:
        # A worker started by Lightning (or torchrun) under our rank 0: reuse its plan verbatim.
        data = json.loads(env[PLAN_ENV])
        return DevicePlan(**data)
    if cuda_count is None:
        cuda_count = _cuda_count()
    warnings: list[str] = []
    gpu_ids = list(gpu_ids) if gpu_ids is not None else [0]
    if num_gpus < 1:
        raise ConfigError("num_gpus", f"{num_gpus} must be at least 1")
    if num_nodes < 1:
        raise ConfigError("num_nodes", f"{num_nodes} must be at least 1")
    if any(int(i) < 0 for i in gpu_ids):
        raise ConfigError("gpu_ids", f"{gpu_ids} contains a negative id")

    # TAO's reconciliation (EP:195-199), loud instead of silent.
    if num_gpus != len(gpu_ids):
        new_n = max(num_gpus, len(gpu_ids))
        new_ids = gpu_ids if len(gpu_ids) == new_n else list(range(new_n))
        warnings.append(
            f"num_gpus={num_gpus} and gpu_ids={gpu_ids} disagree; using num_gpus={new_n}, gpu_ids={new_ids}"
        )
        num_gpus, gpu_ids = new_n, new_ids

    slurm = False
    if "WORLD_SIZE" in env and str(env.get("WORLD_SIZE", "")).strip() != "":
        nodes = _int_env(env, "WORLD_SIZE", low=1, what="TAO reads WORLD_SIZE as the number of nodes")
        if nodes > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
            if not (env.get("NODE_RANK") or env.get("RANK")):
                missing.append("NODE_RANK")
            if missing:
                raise ConfigError(
                    "environment", f"WORLD_SIZE={nodes} (nodes) but {', '.join(missing)} is not set",
                    "set MASTER_ADDR, MASTER_PORT and NODE_RANK on every node, or unset WORLD_SIZE",
                )
        rank_key = "NODE_RANK" if env.get("NODE_RANK") else ("RANK" if env.get("RANK") else None)
        if rank_key:
            _int_env(env, rank_key, low=0, high=nodes - 1, what=f"must be below WORLD_SIZE={nodes}")
        if env.get("MASTER_PORT"):
            _int_env(env, "MASTER_PORT", low=1024, high=65535)
        if env.get("NUM_GPU_PER_NODE"):
            high = cuda_count if cuda_count > 0 else None
            per_node = _int_env(env, "NUM_GPU_PER_NODE", low=1, high=high,
                                what=f"{cuda_count} CUDA device(s) are visible" if cuda_count else "")
            if per_node != num_gpus:
                warnings.append(f"NUM_GPU_PER_NODE={per_node} overrides num_gpus={num_gpus}")
                num_gpus = per_node
                gpu_ids = list(range(per_node))
        if nodes != num_nodes:
            warnings.append(f"WORLD_SIZE={nodes} (nodes) overrides num_nodes={num_nodes}")
        num_nodes = nodes
    elif _slurm_detected(env):
        slurm = True
        if env.get("SLURM_NNODES"):
            nodes = _int_env(env, "SLURM_NNODES", low=1)
            if nodes != num_nodes:
                warnings.append(f"SLURM_NNODES={nodes} overrides num_nodes={num_nodes}")
            num_nodes = nodes

    if cuda_count > 0:
        bad = [i for i in gpu_ids if i >= cuda_count]
        if bad:
            raise ConfigError(
                "gpu_ids", f"{gpu_ids} asks for GPU {bad[0]} but only {cuda_count} CUDA device(s) are visible",
                f"use ids below {cuda_count} or fewer num_gpus",
            )
        return DevicePlan("gpu", list(gpu_ids), num_nodes, list(gpu_ids), num_gpus * num_nodes, warnings, slurm)
    if gpu_ids != list(range(num_gpus)):
        warnings.append(f"no CUDA device is visible: ignoring gpu_ids={gpu_ids}, running {num_gpus} CPU process(es)")
    elif num_gpus > 1:
        warnings.append(f"no CUDA device is visible: num_gpus={num_gpus} runs {num_gpus} CPU processes "
                        "(DDP over gloo), not GPUs")
    return DevicePlan("cpu", num_gpus, num_nodes, [], num_gpus * num_nodes, warnings, slurm)


def plan_for_action(cfg, action: str, env: Mapping[str, str] | None = None,
                    cuda_count: int | None = None) -> DevicePlan:
    """The plan for ``action``: its section's device fields for train/evaluate/inference, one device otherwise."""
    section = cfg.get(action) if action in DEVICE_ACTIONS else None
    if section is None or "num_gpus" not in section:
        env = {k: v for k, v in (os.environ if env is None else env).items() if k == PLAN_ENV or k == "LOCAL_RANK"}
        plan = plan_devices(1, [0], 1, env=env, cuda_count=cuda_count)
        if plan.accelerator == "gpu":
            gpu_id = int(section.get("gpu_id", 0)) if section is not None and "gpu_id" in section else 0
            count = cuda_count if cuda_count is not None else _cuda_count()
            gpu_id = gpu_id if gpu_id < count else 0
            plan = DevicePlan("gpu", [gpu_id], 1, [gpu_id], 1, plan.warnings)
        return plan
    return plan_devices(
        int(section.num_gpus), list(section.get("gpu_ids", [0]) or [0]), int(section.get("num_nodes", 1) or 1),
        env=env, cuda_count=cuda_count,
    )


def is_launch_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """True in the process that should write run files (status, logs, experiment.yaml) before DDP starts.

    Every rank variable that is set (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``SLURM_PROCID``) must be 0.
    """
    env = os.environ if env is None else env
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        raw = env.get(key)
        if raw not in (None, ""):
            try:
                if int(raw) != 0:
                    return False
            except ValueError:
                return False
    return True
