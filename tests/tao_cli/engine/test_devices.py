"""Device plan: TAO's num_gpus/gpu_ids reconciliation table, CUDA checks, CPU mapping, multi-node env."""
from __future__ import annotations

import pytest

from networks.common.errors import ConfigError
from tao_cli.engine.devices import PLAN_ENV, DevicePlan, is_launch_rank_zero, plan_devices, plan_for_action

from .helpers import make_cfg

# TAO §2.2: (num_gpus, gpu_ids) -> (num_gpus, gpu_ids), and whether the user's values were changed.
TABLE = [
    (1, [0], 1, [0], False),
    (1, [3], 1, [3], False),
    (2, [0], 2, [0, 1], True),
    (2, [3], 2, [0, 1], True),
    (1, [2, 3], 2, [2, 3], True),
    (4, [2, 3], 4, [0, 1, 2, 3], True),
    (2, [5, 6], 2, [5, 6], False),
]


@pytest.mark.parametrize("n, ids, want_n, want_ids, warned", TABLE)
def test_tao_reconciliation_table_with_cuda(n, ids, want_n, want_ids, warned):
    plan = plan_devices(n, ids, 1, env={}, cuda_count=8)
    assert plan.accelerator == "gpu"
    assert plan.devices == want_ids and plan.gpu_ids == want_ids
    assert plan.world_size == want_n
    assert bool(plan.warnings) == warned
    if warned:
        assert f"num_gpus={want_n}" in plan.warnings[0]


def test_gpu_id_not_visible_is_config_error():
    with pytest.raises(ConfigError, match=r"gpu_ids.*GPU 3 but only 2 CUDA"):
        plan_devices(1, [3], 1, env={}, cuda_count=2)
    with pytest.raises(ConfigError, match="gpu_ids"):
        plan_devices(4, [0], 1, env={}, cuda_count=2)  # regenerated ids 0..3 exceed 2 devices


def test_cpu_processes():
    plan = plan_devices(2, [0, 1], 1, env={}, cuda_count=0)
    assert (plan.accelerator, plan.devices, plan.gpu_ids, plan.world_size) == ("cpu", 2, [], 2)
    assert plan.warnings == ["no CUDA device is visible: num_gpus=2 runs 2 CPU processes (DDP over gloo), not GPUs"]
    plan = plan_devices(1, [3], 1, env={}, cuda_count=0)
    assert plan.devices == 1 and any("ignoring gpu_ids=[3]" in w for w in plan.warnings)


def test_multi_node_env_sets_nodes_and_gpus_per_node():
    env = {"WORLD_SIZE": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "NUM_GPU_PER_NODE": "4"}
    plan = plan_devices(1, [0], 1, env=env, cuda_count=8)
    assert plan.num_nodes == 2 and plan.devices == [0, 1, 2, 3] and plan.world_size == 8
    assert any("WORLD_SIZE=2" in w for w in plan.warnings)
    # RANK is accepted in place of NODE_RANK (TAO: NODE_RANK or RANK)
    env2 = dict(env, RANK="0")
    del env2["NODE_RANK"]
    assert plan_devices(1, [0], 2, env=env2, cuda_count=8).warnings == ["NUM_GPU_PER_NODE=4 overrides num_gpus=1"]


def test_single_node_world_size_one_needs_nothing_else():
    plan = plan_devices(1, [0], 1, env={"WORLD_SIZE": "1"}, cuda_count=1)
    assert plan.num_nodes == 1 and plan.warnings == []


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "two"}, r"environment WORLD_SIZE: 'two' is not an integer"),
    ({"WORLD_SIZE": "0"}, r"environment WORLD_SIZE: 0 is outside 1\.\.inf"),
    ({"WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_PORT": "29500"}, r"MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}, r"NODE_RANK is not set"),
    ({"WORLD_SIZE": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"},
     r"environment NODE_RANK: 2 is outside 0\.\.1"),
    ({"WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "80"},
     r"environment MASTER_PORT: 80 is outside 1024\.\.65535"),
    ({"WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500", "NUM_GPU_PER_NODE": "9"},
     r"NUM_GPU_PER_NODE: 9 is outside 1\.\.8"),
])
def test_multi_node_env_errors(env, match):
    with pytest.raises(ConfigError, match=match):
        plan_devices(1, [0], 1, env=env, cuda_count=8)


def test_slurm_takes_node_count():
    env = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}
    plan = plan_devices(4, [0, 1, 2, 3], 1, env=env, cuda_count=4)
    assert plan.slurm and plan.num_nodes == 2 and plan.world_size == 8
    # an interactive allocation is not a Slurm launch (Lightning's rule)
    plan = plan_devices(1, [0], 1, env=dict(env, SLURM_JOB_NAME="bash"), cuda_count=4)
    assert not plan.slurm and plan.num_nodes == 1


def test_worker_reuses_rank0_plan():
    plan = DevicePlan("cpu", 2, 1, [], 2, [])
    env = {PLAN_ENV: plan.to_json(), "LOCAL_RANK": "1", "WORLD_SIZE": "2"}  # WORLD_SIZE = processes here
    assert plan_devices(1, [0], 1, env=env, cuda_count=0) == plan


def test_plan_for_action_uses_the_action_section_and_one_device_otherwise():
    cfg = make_cfg({"train.num_gpus": 2, "evaluate.num_gpus": 1})
    assert plan_for_action(cfg, "train", env={}, cuda_count=0).devices == 2
    assert plan_for_action(cfg, "evaluate", env={}, cuda_count=0).devices == 1
    assert plan_for_action(cfg, "export", env={}, cuda_count=0).world_size == 1


def test_launch_rank_zero():
    assert is_launch_rank_zero({})
    assert is_launch_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "0"})
    assert not is_launch_rank_zero({"LOCAL_RANK": "1"})
    assert not is_launch_rank_zero({"NODE_RANK": "1"})
    assert not is_launch_rank_zero({"SLURM_PROCID": "3"})
