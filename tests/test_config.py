"""The Hydra config: the eight experiments compose to the README's settings; bad input fails
early, briefly and before anything is loaded or logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_sweep

from pnn.config import ConfigError, load_config, validate

# From the reproduction's README (../shared/reference/seed-README.txt), flag by flag.
README = {
    "e1_baseline_resnet18": dict(
        model="resnet18",
        nf=44,
        bs=10,
        lr=1e-3,
        first=0,
        filt=0,
        M=1,
        unique=True,
        train=False,
        mix=False,
        acc=91.8,
    ),
    "e2_original_noiseresnet18": dict(
        model="noiseresnet18",
        nf=128,
        bs=10,
        lr=1e-4,
        first=7,
        filt=0,
        M=1,
        unique=True,
        train=False,
        mix=False,
        acc=85.7,
    ),
    "e3_original_first3x3": dict(
        model="noiseresnet18",
        nf=128,
        bs=10,
        lr=1e-4,
        first=3,
        filt=0,
        M=1,
        unique=True,
        train=False,
        mix=False,
        acc=86.2,
    ),
    "e4_conv1x1_no_noise": dict(
        model="perturb_resnet18",
        nf=128,
        bs=16,
        lr=1e-3,
        first=3,
        filt=1,
        M=1,
        unique=True,
        train=False,
        mix=False,
        acc=85.5,
    ),
    "e5_pnn_all_layers": dict(
        model="perturb_resnet18",
        nf=128,
        bs=16,
        lr=1e-3,
        first=0,
        filt=0,
        M=1,
        unique=True,
        train=False,
        mix=False,
        acc=72.6,
    ),
    "e6_pnn_unique_masks_mix_maps": dict(
        model="perturb_resnet18",
        nf=128,
        bs=16,
        lr=1e-3,
        first=3,
        filt=0,
        M=64,
        unique=True,
        train=False,
        mix=True,
        acc=82.7,
    ),
    "e7_pnn_shared_masks": dict(
        model="perturb_resnet18",
        nf=128,
        bs=16,
        lr=1e-3,
        first=3,
        filt=0,
        M=64,
        unique=False,
        train=False,
        mix=False,
        acc=82.4,
    ),
    "e8_pnn_trained_masks": dict(
        model="perturb_resnet18",
        nf=128,
        bs=16,
        lr=1e-3,
        first=3,
        filt=0,
        M=64,
        unique=False,
        train=True,
        mix=False,
        acc=85.9,
    ),
}


def test_the_experiment_group_holds_exactly_the_eight() -> None:
    names = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("e*.yaml"))
    assert names == sorted(README)
    # `experiment=none` (the bare defaults) is the only other option, and glob(e*) skips it.
    others = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")} - set(names)
    assert others == {"none"}


@pytest.mark.parametrize("name", sorted(README))
def test_experiment_composes_to_readme_settings(name: str) -> None:
    cfg = load_config([f"experiment={name}"])
    want = README[name]
    assert cfg.experiment == name
    assert cfg.published_test_acc == want["acc"]
    assert cfg.description and "\n" not in cfg.description
    assert cfg.model.name == want["model"]
    assert cfg.model.nfilters == want["nf"]
    assert cfg.model.first_filter_size == want["first"]
    assert cfg.model.filter_size == want["filt"]
    assert cfg.train.batch_size == want["bs"]
    assert cfg.optimizer.lr == pytest.approx(want["lr"])
    assert (cfg.masks.nmasks, cfg.masks.unique, cfg.masks.train, cfg.masks.mix_maps) == (
        want["M"],
        want["unique"],
        want["train"],
        want["mix"],
    )
    # Everything the README does not set stays at the reference defaults.
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.nesterov
    assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 1e-4)
    assert (cfg.noise.type, cfg.noise.level, cfg.noise.scale) == ("uniform", 0.5, 1.0)
    assert (cfg.model.act, cfg.model.use_act, cfg.model.pool_type) == ("relu", False, "max")
    assert cfg.model.dropout == 0.5
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.precision) == (150, 1, "fp32")
    assert cfg.dataset.name == "cifar10"
    assert list(cfg.dataset.lr_milestones) == [60, 90, 120, 160] and cfg.dataset.lr_gamma == 0.2


def test_overrides_apply_on_top_of_an_experiment() -> None:
    cfg = load_config(["experiment=e7_pnn_shared_masks", "masks.nmasks=32", "noise=normal"])
    assert cfg.masks.nmasks == 32 and cfg.noise.type == "normal" and not cfg.masks.unique


def test_smoke_profile_wins_over_the_experiment_and_keeps_the_model() -> None:
    cfg = load_config(["experiment=e6_pnn_unique_masks_mix_maps", "profile=smoke"])
    assert cfg.dataset.name == "synthetic" and cfg.train.epochs == 1
    assert cfg.train.max_steps_per_epoch is not None
    assert cfg.model.nfilters == 128 and cfg.masks.nmasks == 64 and cfg.train.batch_size == 16


def test_dataset_schedules_follow_the_reference() -> None:
    assert list(load_config(["dataset=cifar100"]).dataset.lr_milestones) == [80, 120, 160]
    assert load_config(["dataset=cifar100"]).dataset.lr_gamma == 0.1
    assert list(load_config(["dataset=mnist", "model=lenet"]).dataset.lr_milestones) == [30, 60, 90]
    cfg = load_config(["dataset.lr_milestones=[10,20]", "dataset.lr_gamma=0.5"])
    assert list(cfg.dataset.lr_milestones) == [10, 20] and cfg.dataset.lr_gamma == 0.5


def test_seed_zero_is_a_seed() -> None:
    assert load_config(["train.seed=0"]).train.seed == 0


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["masks.nmasks=0"], "masks.nmasks must be >= 1 (got 0)"),
        (["model.filter_size=2"], "model.filter_size must be one of {0, 1, 3, 5, 7}"),
        (["model.first_filter_size=9"], "model.first_filter_size must be one of"),
        (["model.act=swish"], "model.act must be one of {relu, lrelu, prelu, rrelu"),
        (["model.pool_type=median"], "model.pool_type must be one of {max, avg}"),
        (["noise.type=pink"], "noise.type must be one of {uniform, normal}"),
        (["model.name=vgg"], "model.name must be one of"),
        (["optimizer.name=lbfgs"], "optimizer.name must be one of {sgd, adam, rmsprop}"),
        (["dataset.name=imagenet"], "dataset.name must be one of"),
        (["optimizer.lr=0"], "optimizer.lr must be > 0"),
        (["optimizer.lr=-1e-3"], "optimizer.lr must be > 0"),
        (["train.batch_size=0"], "train.batch_size must be >= 1"),
        (["train.epochs=-1"], "train.epochs must be >= 0"),
        (["train.device=tpu"], "train.device must be one of {auto, cpu, cuda}"),
        (["train.precision=fp16"], "train.precision must be one of {fp32, bf16}"),
        (["train.fast=on"], "train.fast must be one of {auto, off}"),
        (["model=noiseresnet18", "model.first_filter_size=0"], "model.first_filter_size"),
        (
            ["model.first_filter_size=0", "model.nfilters=128", "masks.nmasks=64"],
            "masks.nmasks=64 > 1 needs",
        ),
        (["dataset=mnist"], "needs 32x32 inputs"),
        (["dataset.test_name=cifar100"], "dataset.test_name=cifar100"),
    ],
)
def test_bad_values_raise_a_short_error_naming_the_key(overrides: list[str], needle: str) -> None:
    cfg = load_config(overrides, validate_config=False)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value)
    assert len(str(err.value)) < 400


@pytest.mark.slow  # runs sweep.py
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["model.nfilter=3"], ["model.nfilter"]),
        (["train.batch_size=abc"], ["train.batch_size"]),
        (["experiment=e9_nonexistent"], ["experiment/e9_nonexistent", "e8_pnn_trained_masks"]),
        (["masks.nmasks=0"], ["masks.nmasks must be >= 1 (got 0)"]),
        (
            ["experiment=e7_pnn_shared_masks", "optimizer.lr=1e-3,0"],
            ["optimizer.lr must be > 0", "in 1 of 2 jobs"],
        ),
        (["model.act=swish", "model=lenet"], ["model.act must be one of"]),
        # A rule only the model's shapes know, caught by building it on the meta device.
        (["experiment=e7_pnn_shared_masks", "model.filter_size=5"], ["model.filter_size"]),
    ],
)
def test_cli_rejects_bad_input_before_loading_or_logging(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    proc = run_sweep([*args, "profile=smoke"], tmp_path)
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert len((proc.stderr + proc.stdout).splitlines()) < 25
    # Nothing was logged, downloaded or written.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow  # runs sweep.py
def test_help_lists_groups_options_and_experiments(tmp_path: Path) -> None:
    proc = run_sweep(["--help"], tmp_path)
    assert proc.returncode == 0
    for word in ("model:", "noise:", "masks:", "optimizer:", "dataset:", "profile:", "smoke"):
        assert word in proc.stdout
    for name in README:
        assert name in proc.stdout


@pytest.mark.slow  # runs sweep.py
def test_dry_run_prints_reference_counts_for_all_eight(tmp_path: Path) -> None:
    # glob(*) also takes experiment=none, the bare defaults, reported as "custom".
    proc = run_sweep(["-m", "experiment=glob(*)", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["experiment"] for line in lines].count("custom") == 1
    lines = [line for line in lines if line["experiment"] != "custom"]
    got = {line["experiment"]: (line["params"], line["trainable"]) for line in lines}
    assert got == {
        "e1_baseline_resnet18": (5_284_982, 5_284_982),
        "e2_original_noiseresnet18": (5_640_074, 5_640_074),
        "e3_original_first3x3": (5_624_714, 5_624_714),
        "e4_conv1x1_no_noise": (5_611_146, 5_611_146),
        "e5_pnn_all_layers": (5_608_202, 5_608_202),
        "e6_pnn_unique_masks_mix_maps": (6_813_834, 6_813_834),
        "e7_pnn_shared_masks": (1_220_234, 1_220_234),
        "e8_pnn_trained_masks": (1_220_234, 1_632_906),
    }
    masks = {line["experiment"]: line["mask_values"] for line in lines}
    assert masks["e5_pnn_all_layers"] == 1_100_800
    assert masks["e6_pnn_unique_masks_mix_maps"] == 70_254_592
    assert masks["e7_pnn_shared_masks"] == masks["e8_pnn_trained_masks"] == 412_672
    assert {line["model"] for line in lines} == {"resnet18", "noiseresnet18", "perturb_resnet18"}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow  # runs sweep.py
def test_experiment_none_runs_the_bare_defaults(tmp_path: Path) -> None:
    proc = run_sweep(["experiment=none", "model=lenet", "dataset=mnist", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert (line["experiment"], line["model"]) == ("custom", "lenet")


@pytest.mark.slow  # runs sweep.py
def test_dry_run_of_one_experiment_with_overrides(tmp_path: Path) -> None:
    args = ["experiment=e7_pnn_shared_masks", "masks.nmasks=32", "dry_run=true"]
    proc = run_sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert line["experiment"] == "e7_pnn_shared_masks" and line["model"] == "perturb_resnet18"
    assert set(line) == {"experiment", "model", "params", "mask_values", "trainable"}
    # From e7's figures at its 64 masks (the reference's, above), by how the masks count: each
    # of the 16 perturbing layers holds one shared 1 x nmasks x H x W mask tensor, and its 1x1
    # conv (grouped by input channel) gives each output channel nmasks weights. The layers'
    # output channels are 4 x (128, 256, 512, 1024).
    weights_per_mask = 4 * (128 + 256 + 512 + 1024)
    assert line["mask_values"] == 412_672 * 32 // 64
    assert line["params"] == line["trainable"] == 1_220_234 - (64 - 32) * weights_per_mask
