"""Composition errors as one line: a key of another option of its group is named as such, and a
launcher or sweeper without -m is refused (stepwise.config.cli_errors)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from stepwise.config.cli_errors import check_launcher, chosen_option, known_keys, one_line
from stepwise.config.schemas import DDPConfig, ParallelConfig, TorchvisionDataConfig
from stepwise.main import CONF_DIR


def _composition_line(*overrides: str) -> str | None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as caught:
            compose(config_name="config", overrides=list(overrides))
    return one_line(caught.value, list(overrides))


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.timeout_s=0"], "parallel.timeout_s=0: no such key for parallel=single (it is a "
                               "key of parallel=ddp|fsdp); fix: add one of parallel=ddp|fsdp"),
    (["parallel=single", "parallel.nproc=2"], "parallel.nproc=2: no such key for parallel=single "
                                              "(it is a key of parallel=ddp|fsdp); fix: replace "
                                              "parallel=single by one of parallel=ddp|fsdp"),
    (["parallel=ddp", "parallel.device_ids=[0]"],
     "parallel.device_ids=[0]: no such key for parallel=ddp (it is a key of parallel=dp); fix: "
     "replace parallel=ddp by parallel=dp"),
    # FSDP refuses DP's key with its reason, instead of suggesting DP.
    (["parallel=fsdp", "parallel.device_ids=[0,1]"],
     "parallel.device_ids=[0,1]: FSDP runs one process per device and shards the model over "
     "them; it cannot drive several devices from one process, as nn.DataParallel does; fix: drop "
     "parallel.device_ids; parallel.nproc sets the processes (one per GPU), CUDA_VISIBLE_DEVICES "
     "which GPUs"),
    (["parallel=fsdp", "parallel.sync_batchnorm=true"],
     "parallel.sync_batchnorm=true: no such key for parallel=fsdp (it is a key of parallel=ddp); "
     "fix: replace parallel=fsdp by parallel=ddp"),
    (["optim.betas=[0.9,0.99]"], "optim.betas=[0.9,0.99]: no such key for optim=sgd (it is a key "
                                 "of optim=adamw); fix: add optim=adamw"),
    (["optim=adamw", "optim.momentum=0.9"], "optim.momentum=0.9: no such key for optim=adamw (it "
                                            "is a key of optim=sgd); fix: replace optim=adamw by "
                                            "optim=sgd"),
    (["model.widths=[8]"], "model.widths=[8]: no such key for model=mlp (it is a key of "
                           "model=cnn); fix: add model=cnn"),
    (["model=linear", "model.hidden_sizes=[8]"],
     "model.hidden_sizes=[8]: no such key for model=linear (it is a key of model=mlp); fix: "
     "replace model=linear by model=mlp"),
    # The experiment chose model=torchvision: Hydra's node says so, not the command line.
    (["experiment=cifar10_resnet18", "model.hidden_sizes=[8]"],
     "model.hidden_sizes=[8]: no such key for model=torchvision (it is a key of model=mlp); "
     "fix: add model=mlp"),
    (["data.root=/x"], "data.root=/x: no such key for data=digits (it is a key of "
                       "data=imagefolder|mnist|cifar10); fix: add one of "
                       "data=imagefolder|mnist|cifar10"),
    (["data=mnist", "data.num_features=4"],
     "data.num_features=4: no such key for data=mnist (it is a key of data=synthetic); fix: "
     "replace data=mnist by data=synthetic"),
    # A split an option does not have: MNIST's and CIFAR-10's test split is their own test set.
    (["data=mnist", "data.test_fraction=0.1"],
     "data.test_fraction=0.1: data=mnist's test split is its own test set (read from data.root), "
     "not a part of its training set; fix: drop it (data.val_fraction sets the validation part "
     "of the training set), or use data=imagefolder for a split of your own"),
    (["data=synthetic", "data.test_fraction=0.2"],
     "data.test_fraction=0.2: no such key for data=synthetic (it is a key of "
     "data=digits|imagefolder); fix: replace data=synthetic by one of data=digits|imagefolder"),
    (["data.test={_target_: mypkg.Test}"], "data.test={_target_: mypkg.Test}: no such key for "
     "data=digits (it is a key of data=dataset); fix: add data=dataset"),
    # A misspelling: the nearest key, and whose it is when it is another option's.
    (["parallel.timeout=5"], "parallel.timeout=5: no such key for parallel=single; fix: did you "
                             "mean parallel.timeout_s, a key of parallel=ddp|fsdp? (add one of "
                             "parallel=ddp|fsdp)"),
    (["model.hiden_sizes=[8]"], "model.hiden_sizes=[8]: no such key for model=mlp; fix: did you "
                                "mean model.hidden_sizes?"),
    (["optim.momentun=0.5"], "optim.momentun=0.5: no such key for optim=sgd; fix: did you mean "
                             "optim.momentum?"),
    (["model.foo=1"], "model.foo=1: no such key for model=mlp; fix: check the key's spelling "
                      "(model=mlp has model.hidden_sizes, model.activation)"),
    # Groups of one option keep the short form.
    (["trainer.max_step=3"], "trainer.max_step=3: no such key; fix: did you mean trainer.max_steps?"),
])
def test_a_key_of_another_option_is_named_as_such(overrides, expected):
    line = _composition_line(*overrides)
    assert line == expected
    key = line.split("=", 1)[0]
    assert f"did you mean {key}?" not in line  # never the rejected key itself


def test_the_option_comes_from_hydra_then_the_command_line_then_config_yaml():
    assert chosen_option("parallel", DDPConfig, []) == "ddp"
    assert chosen_option("parallel", None, []) == "single"  # conf/config.yaml's default
    assert chosen_option("parallel", None, ["parallel=dp"]) == "dp"
    assert chosen_option("parallel", ParallelConfig, ["parallel=single"]) == "single"
    # mnist and cifar10 share a schema: the command line tells them apart.
    assert chosen_option("data", TorchvisionDataConfig, ["data=cifar10"]) == "cifar10"
    assert chosen_option("data", TorchvisionDataConfig, []) == "mnist|cifar10"
    assert "parallel.timeout_s" in known_keys()


@pytest.mark.parametrize("argv,expected", [
    (["hydra/launcher=slurm", "accum=2"],
     "hydra/launcher=slurm: a launcher runs multirun jobs only; fix: add -m "
     "(python train.py -m hydra/launcher=slurm accum=2)"),
    (["accum=2", "hydra/launcher=local"],
     "hydra/launcher=local: a launcher runs multirun jobs only; fix: add -m "
     "(python train.py -m accum=2 hydra/launcher=local)"),
    (["hparams_search=optuna"], "hparams_search=optuna: a hyperparameter search (a sweeper) runs "
                                "multirun jobs only; fix: add -m (python train.py -m "
                                "hparams_search=optuna)"),
    (["hydra/sweeper=optuna"], "hydra/sweeper=optuna: a sweeper runs multirun jobs only"),
    (["hydra/launcher=slurm", "data.root=a b"], "(python train.py -m hydra/launcher=slurm "
                                                "'data.root=a b')"),
    (["-m", "hydra/launcher=slurm", "accum=1,2"], None),
    (["--multirun", "hydra/launcher=slurm"], None),
    (["--multi", "hydra/launcher=slurm"], None),  # argparse takes unambiguous prefixes
    (["hydra.mode=MULTIRUN", "hydra/launcher=slurm"], None),
    (["hydra/launcher=basic", "accum=2"], None),  # the default: nothing is ignored
    (["hparams_search=null"], None),
    (["accum=2"], None),
])
def test_a_launcher_without_multirun_is_refused(argv, expected):
    message = check_launcher(argv)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message and "; fix: " in message
