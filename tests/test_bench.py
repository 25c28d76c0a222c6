"""bench/throughput.py: its Hydra-free experiment table, and a one-step CPU run without Hydra."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pnn.config import load_config
from pnn.model import fused
from pnn.model.layers import PerturbLayer
from pnn.model.models import build_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import layer_paths  # noqa: E402
import throughput  # noqa: E402

SECTIONS = ("model", "noise", "masks", "optimizer", "dataset", "train")


@pytest.mark.parametrize("name", list(throughput.EXPERIMENTS))
def test_fallback_configs_equal_the_composed_ones(name: str) -> None:
    composed = OmegaConf.to_container(load_config([f"experiment={name}"]))
    fallback = dataclasses.asdict(throughput.fallback_config(name))
    assert fallback["experiment"] == composed["experiment"] == name
    for section in SECTIONS:
        assert fallback[section] == composed[section], section


def test_every_experiment_file_is_in_the_table() -> None:
    files = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("e*.yaml"))
    assert files == sorted(throughput.EXPERIMENTS)
    assert throughput.experiment_name("e7") == "e7_pnn_shared_masks"


@pytest.mark.slow  # a subprocess with a full-size e5 step
def test_one_cpu_step_without_hydra(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # sys.modules["hydra"] = None makes every `import hydra` fail, as on the GPU image.
    code = (
        "import runpy, sys; sys.modules['hydra'] = None; "
        f"sys.argv = ['throughput.py', '--device', 'cpu', '--steps', '1', '--warmup', '0', "
        f"'--experiments', 'e5', '--json', {str(out)!r}]; "
        f"runpy.run_path({str(ROOT / 'bench' / 'throughput.py')!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "e5_pnn_all_layers" in done.stdout and "img/s" in done.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["batch_size"] == 16
    assert (result["params"], result["mask_values"]) == (5_608_202, 1_100_800)  # the README's
    assert result["img_per_s"] > 0 and 0 < result["mean_loss"] < 10


def test_reference_mode_runs_the_dataloader_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """e5 (M = 1 perturbations), narrowed to 8 filters for speed: in reference mode every PNN
    layer runs the reference formulation, the step is the reference loop's, and cuDNN's
    autotuning is back after."""
    calls = []
    original = fused.perturb_reference

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "perturb_reference", counted)
    narrow = throughput.fallback_config("e5_pnn_all_layers")
    narrow.model.nfilters = 8
    monkeypatch.setattr(throughput, "experiment_config", lambda name: copy.deepcopy(narrow))
    model = build_model(narrow)
    perturbing = sum(isinstance(m, PerturbLayer) and m.filter_size == 0 for m in model.modules())
    assert perturbing == 17  # e5 perturbs in every layer, the stem too
    out = tmp_path / "reference.json"
    argv = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--experiments", "e5"]
    benchmark = torch.backends.cudnn.benchmark
    assert (
        throughput.main([*argv, "--mode", "reference", "--workers", "0", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["mode"] == "reference"
    assert report["results"][0]["img_per_s"] > 0
    assert calls == [16] * perturbing  # one training step at batch 16, through every layer
    assert "step" not in report["results"][0]  # the reference loop, not build_train_step's
    assert torch.backends.cudnn.benchmark == benchmark


def test_layer_paths_agree_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/layer_paths.py's three ways on a small layer (on CPU "fast" is the eager path),
    each measured against the reference formulation."""
    cases = [(4, 8, 6, 3, True, True, "prelu")]
    # The case's conv is initialised from torch's global generator, seeded at random in each
    # process: some draws put the prelu weight's gradient (a sum that nearly cancels) past
    # 1e-5 from float32 rounding alone. One fixed draw instead.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rows = layer_paths.check_fast_path("cpu", batch=2, cases=cases)
    assert [row["way"] for row in rows] == ["reference", "eager", "fast"]
    assert all(row["max_rel_error"] < 1e-5 for row in rows)

    # The fused paths made 0.1% off (output, hence every gradient, scaled by 1.001) while the
    # reference way stays exact: the check must measure that 1e-3 for them, and refuse it.
    def off(*args: object, **kwargs: object) -> torch.Tensor:
        settings = args[-1]
        y = fused.perturb_conv(*args, **kwargs)
        return y if settings.reference else y * 1.001

    monkeypatch.setattr(layer_paths, "perturb_conv", off)
    rows = layer_paths.check_fast_path("cpu", batch=2, cases=cases, rtol=1.0)
    errors = {row["way"]: row["max_rel_error"] for row in rows}
    assert errors["eager"] == pytest.approx(1e-3, rel=1e-2)
    assert errors["fast"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(AssertionError, match="fast path differs from the reference"):
        layer_paths.check_fast_path("cpu", batch=2, cases=cases)


@pytest.mark.slow  # two e1 models, three steps each, on the CPU
def test_seeds_bench_packs_seeds_without_hydra(tmp_path: Path) -> None:
    out = tmp_path / "seeds.json"
    code = (
        "import runpy, sys; sys.modules['hydra'] = None; "
        f"sys.argv = ['seeds.py', '--device', 'cpu', '--steps', '1', '--warmup', '1', "
        f"'--experiments', 'e1', '--seeds', '1,2', '--json', {str(out)!r}]; "
        f"runpy.run_path({str(ROOT / 'bench' / 'seeds.py')!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["results"]
    e1 = "e1_baseline_resnet18"
    assert [(r["experiment"], r["k"]) for r in rows] == [(e1, 1), (e1, 2)]
    for row in rows:
        # On the CPU a packed seed computes bitwise what it computes alone.
        assert row["packed"]["mean_loss"] == row["one_after_another"]["mean_loss"]
        assert row["loss_max_abs_diff"] == 0.0 and row["packed"]["img_per_s"] > 0
    assert rows[1]["packed"]["mean_loss"][0] != rows[1]["packed"]["mean_loss"][1]
