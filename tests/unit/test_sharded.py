"""parallel=fsdp without a process group: which modules are sharded, the checks of
`parallel.shard_modules` and of the world, and the optimizer state by parameter name."""

from __future__ import annotations

import pytest
import torch

from stepwise.config.schemas import FSDPConfig
from stepwise.contract.dist_env import DistEnv, detect
from stepwise.contract.errors import ConfigError
from stepwise.contract.world import World, resolve_world, submitit_tasks_per_node
from stepwise.models import MLP
from stepwise.models.lm import TinyLM
from stepwise.parallel.fsdp import _by_name, check_shard_modules, mixed_precision, shard_units

SRUN = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NODELIST": "n[1-2]"}


def test_by_default_each_child_with_parameters_is_a_unit():
    mlp = MLP((8,), 3, [16, 16])  # Linear, ReLU, Linear, ReLU, Linear
    assert shard_units(mlp, None) == [mlp[0], mlp[2], mlp[4]]
    lm = TinyLM(num_outputs=11, dim=8, layers=2, heads=2, context=16)
    # The blocks of the ModuleList in its place (a ModuleList is never called); no dropout.
    assert shard_units(lm, None) == [lm.tokens, lm.positions, lm.blocks[0], lm.blocks[1],
                                     lm.norm, lm.head]


def test_named_classes_are_units_innermost_first():
    lm = TinyLM(num_outputs=11, dim=8, layers=2, heads=2, context=16)
    assert shard_units(lm, ("Block",)) == [lm.blocks[1], lm.blocks[0]]
    # A block's Sequential (its MLP) is sharded before the block that holds it.
    units = shard_units(lm, ("Block", "Sequential"))
    assert units.index(lm.blocks[0].mlp) < units.index(lm.blocks[0])
    assert shard_units(lm, ()) == []  # only the root


@pytest.mark.parametrize("names,fix", [
    (["Blok"], "did you mean Block?"),
    (["Block", "LayerNorn"], "did you mean LayerNorm?"),
    # ModuleList is not offered: it is never called, so FSDP could not gather its parameters.
    (["Transformer"], "use class names of its modules: Block, CausalSelfAttention, Dropout, "
                      "Embedding, GELU, LayerNorm, Linear, Sequential, TinyLM"),
    (["ModuleList"], "use class names of its modules: Block, CausalSelfAttention, Dropout, "
                     "Embedding, GELU, LayerNorm, Linear, Sequential, TinyLM"),
])
def test_an_unknown_class_names_the_closest(names, fix):
    lm = TinyLM(num_outputs=11, dim=8, layers=1, heads=2, context=16)
    with pytest.raises(ConfigError) as caught:
        check_shard_modules(lm, names)
    assert caught.value.key == "parallel.shard_modules" and str(caught.value).endswith(fix)
    check_shard_modules(lm, ["Block", "Linear"])
    check_shard_modules(lm, None)


def test_the_fsdp_world_is_the_ddp_world():
    assert resolve_world(FSDPConfig(), "cpu", DistEnv(), 0) == World("fsdp", size=2, nproc=2)
    launched = resolve_world(FSDPConfig(nnodes=2), "cpu", detect(SRUN), 0)
    assert (launched.mode, launched.size, launched.nproc, launched.spawns) == ("fsdp", 4, 2, False)
    assert World("fsdp", size=2, nproc=2).spawns
    assert submitit_tasks_per_node("fsdp", None, 8) == 8


@pytest.mark.parametrize("config,env", [(FSDPConfig(nproc=1), {}),
                                        (FSDPConfig(), {"RANK": "0", "WORLD_SIZE": "1",
                                                        "MASTER_ADDR": "127.0.0.1"})])  # torchrun
def test_a_world_of_one_is_refused(config, env):
    with pytest.raises(ConfigError) as caught:
        resolve_world(config, "cpu", detect(env), 0)
    assert str(caught.value).startswith("parallel=fsdp: world_size=1")
    assert str(caught.value).endswith("use parallel=single, or parallel.nproc>=2")


def test_mixed_precision_follows_trainer_precision():
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "MixedPrecisionPolicy"):
        pytest.skip("FSDP2 needs torch >= 2.6 (the torch floor's run)")
    bf16 = mixed_precision("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    for precision in ("32", "64"):
        policy = mixed_precision(precision)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)


def test_optimizer_state_by_index_becomes_by_name():
    model = MLP((3,), 2, [4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    named = _by_name(model, optimizer.state_dict())
    assert list(named["state"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert named["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(named["state"]["2.bias"]["momentum_buffer"],
                       optimizer.state[model[2].bias]["momentum_buffer"])
