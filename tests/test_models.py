"""The five architectures: parameter counts, parameter shapes, checkpoints, errors and init."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch
from torch import nn

from pnn.config import ConfigError, load_config
from pnn.model.layers import NoiseLayer, PerturbLayer
from pnn.model.models import build_model, count_parameters


def model_for(*overrides: str, validate: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(load_config(list(overrides), validate_config=validate))


# --------------------------------------------------------------------------------------------
# The README's eight experiments
# --------------------------------------------------------------------------------------------

# noiseresnet18 keeps one fixed noise value per position of each NoiseLayer's input (C, H, W).
# e2 (7x7 stem, stride 2, then max pool): the stages see 8, 4, 2 and 1 pixels a side.
#   stage 1: 4 layers x 128*8*8                                       = 32,768
#   stage 2: 128*8*8 (before the pool) + 3 x 256*4*4 = 8,192 + 12,288  = 20,480
#   stage 3: 256*4*4 + 3 x 512*2*2 = 4,096 + 6,144                     = 10,240
#   stage 4: 512*2*2 + 3 x 1024*1*1 = 2,048 + 3,072                    =  5,120
#   total                                                              = 68,608
# e3 (3x3 stem): 32, 16, 8 and 4 pixels a side.
#   stage 1: 4 x 128*32*32 = 524,288; stage 2: 128*32*32 + 3 x 256*16*16 = 327,680;
#   stage 3: 256*16*16 + 3 x 512*8*8 = 163,840; stage 4: 512*8*8 + 3 x 1024*4*4 = 81,920;
#   total 1,097,728: the positions of e6's masks, which have 64 masks each (70,254,592 / 64).
EXPECTED_COUNTS = {
    "e1_baseline_resnet18": (5_284_982, 0, 5_284_982),
    "e2_original_noiseresnet18": (5_640_074, 68_608, 5_640_074),
    "e3_original_first3x3": (5_624_714, 1_097_728, 5_624_714),
    "e4_conv1x1_no_noise": (5_611_146, 0, 5_611_146),
    "e5_pnn_all_layers": (5_608_202, 1_100_800, 5_608_202),
    "e6_pnn_unique_masks_mix_maps": (6_813_834, 70_254_592, 6_813_834),
    "e7_pnn_shared_masks": (1_220_234, 412_672, 1_220_234),
    "e8_pnn_trained_masks": (1_220_234, 412_672, 1_632_906),
}


@pytest.mark.parametrize("experiment", list(EXPECTED_COUNTS))
def test_experiment_parameter_counts(experiment: str) -> None:
    counts = count_parameters(model_for(f"experiment={experiment}"))
    assert (counts["params"], counts["mask_values"], counts["trainable"]) == (
        EXPECTED_COUNTS[experiment]
    )


# --------------------------------------------------------------------------------------------
# Parameter shapes, written out from the reference description
# --------------------------------------------------------------------------------------------


def bn(c: int) -> list[tuple]:
    return [(c,), (c,)]


def perturb(cin, cout, k, size, m=1, unique=True, mix=False, prelu=False) -> list[tuple]:
    """One reference PerturbLayer: masks, conv, BN, mix conv, and one (1,) for a PReLU act."""
    shapes = [(1,)] if prelu else []
    if k > 0:
        return shapes + [(cout, cin, k, k)] + ([(cout,)] if k == 1 else []) + bn(cout)
    shapes += [(1, cin if unique else 1, m, size, size)]
    shapes += [(cout, m if m > 1 else cin, 1, 1), (cout,)] + bn(cout)
    return shapes + ([(cout, cout, 1, 1), (cout,)] + bn(cout) if mix else [])


def shortcut(cin: int, cout: int, stride: int) -> list[tuple]:
    return [(cout, cin, 1, 1)] + bn(cout) if stride != 1 or cin != cout else []


def perturb_resnet(nf, classes, stem, sizes, **layer) -> list[tuple]:
    """stem: shapes of the first layer; sizes: each stage's input size."""
    shapes, cin = list(stem), nf
    for width, stride, size in zip((nf, 2 * nf, 4 * nf, 8 * nf), (1, 2, 2, 2), sizes, strict=True):
        shapes += perturb(cin, width, 0, size, **layer) + shortcut(cin, width, stride)
        shapes += perturb(width, width, 0, size // stride, **layer)
        shapes += 2 * perturb(width, width, 0, size // stride, **layer)
        cin = width
    return shapes + [(classes, 8 * nf), (classes,)]


def head(features: int, width: int, classes: int, prelu=False) -> list[tuple]:
    act = [(1,)] if prelu else []
    return [(width, features), (width,)] + bn(width) + act + [(classes, width), (classes,)]


def test_shapes_perturb_resnet18_first7_prelu_cifar100() -> None:
    model = model_for(
        "model=perturb_resnet18",
        "dataset=cifar100",
        "model.nfilters=6",
        "model.first_filter_size=7",
        "model.act=prelu",
        "masks=unique_mix_maps",
        "masks.nmasks=2",
    )
    # 7x7 stride-2 stem: 32 -> 16, MaxPool(3, 2, 1): 16 -> 8; the stages' inputs are 8, 8, 4
    # and 2 a side (each halves inside its first block), and the last map is 1x1.
    stem = perturb(3, 6, 7, 32, prelu=True)
    expected = perturb_resnet(6, 100, stem, (8, 8, 4, 2), m=2, mix=True, prelu=True)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_shapes_perturb_resnet18_first0_shared_trained_normal() -> None:
    model = model_for(
        "model=perturb_resnet18",
        "model.nfilters=6",
        "model.act=elu",
        "model.use_act=true",
        "masks=trained",
        "masks.nmasks=3",
        "noise=normal",
    )
    stem = perturb(3, 6, 0, 32, m=3, unique=False)
    expected = perturb_resnet(6, 10, stem, (32, 32, 16, 8), m=3, unique=False)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    masks = [m.masks for m in model.modules() if isinstance(m, PerturbLayer)]
    assert all(mask.requires_grad for mask in masks)
    assert min(mask.min() for mask in masks) < -1  # N(0, 1), not U(-1, 1)


def test_shapes_cifarnet_filter5_prelu() -> None:
    model = model_for(
        "model=cifarnet",
        "model.nfilters=6",
        "model.filter_size=5",
        "model.act=prelu",
        "masks=shared",
        "masks.nmasks=2",
    )
    # 32 -> P0 32 -> P5 30 -> pool 15 -> 13 -> 11 -> pool 6 -> 4 -> 2 -> pool 1: the head reads
    # 6*1*1 features. (The reference's n = 5 would give 6*5*5 and fail at its first forward.)
    layer = {"m": 2, "unique": False, "prelu": True}
    expected = perturb(3, 6, 0, 32, **layer) + 5 * perturb(6, 6, 5, 0, prelu=True)
    expected += head(6, 256, 10, prelu=True)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shapes_lenet_mnist_filter5() -> None:
    model = model_for(
        "model=lenet",
        "dataset=mnist",
        "model.nfilters=4",
        "model.first_filter_size=5",
        "model.filter_size=5",
        "masks.nmasks=3",
    )
    # 28 -> P5 26 -> pool 13 -> P5 11 -> pool 6 -> P5 4 -> pool 2: 4*2*2 features.
    expected = perturb(1, 4, 5, 28) + 2 * perturb(4, 4, 5, 0) + head(16, 128, 10)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_shapes_lenet_cifar100_masks() -> None:
    model = model_for("model=lenet", "dataset=cifar100", "model.nfilters=8", "masks.nmasks=1")
    # 32 -> P0 32 -> pool 16 -> P0 16 -> pool 8 -> P0 8 -> pool 4: 8*4*4, the reference's n = 4.
    expected = perturb(3, 8, 0, 32) + perturb(8, 8, 0, 16) + perturb(8, 8, 0, 8)
    expected += head(8 * 16, 128, 100)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_shapes_cifarnet_mnist_mix_maps() -> None:
    model = model_for(
        "model=cifarnet", "dataset=mnist", "model.nfilters=8", "masks=unique_mix_maps"
    )
    # 28 -> 28 -> 28 -> pool 14 -> 14 -> 14 -> pool 7 -> 7 -> 7 -> pool 4: 8*4*4 features.
    expected = perturb(1, 8, 0, 28, mix=True) + perturb(8, 8, 0, 28, mix=True)
    expected += 2 * perturb(8, 8, 0, 14, mix=True) + 2 * perturb(8, 8, 0, 7, mix=True)
    expected += head(8 * 16, 256, 10)
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_shapes_noiseresnet18_and_noise_buffers() -> None:
    model = model_for(
        "model=noiseresnet18", "dataset=cifar100", "model.nfilters=4", "model.first_filter_size=3"
    )
    expected, noise, cin = [(4, 3, 3, 3)] + bn(4), [], 4
    for width, stride, size in zip((4, 8, 16, 32), (1, 2, 2, 2), (32, 32, 16, 8), strict=True):
        for block in range(2):
            s = stride if block == 0 else 1
            # NoiseLayer(cin -> width): BN(cin), conv1x1 with bias; pool; BN; NoiseLayer; BN
            expected += bn(cin) + [(width, cin, 1, 1), (width,)] + bn(width)
            expected += bn(width) + [(width, width, 1, 1), (width,)] + bn(width)
            expected += shortcut(cin, width, s)
            noise += [(cin, size, size), (width, size // s, size // s)]
            cin, size = width, size // s
    expected += [(100, 32), (100,)]
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    buffers = [m.noise.shape for m in model.modules() if isinstance(m, NoiseLayer)]
    assert buffers == noise
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_shapes_resnet18() -> None:
    model = model_for("model=resnet18", "model.nfilters=4")
    expected, cin = [(4, 3, 3, 3)] + bn(4), 4
    for width, stride in zip((4, 8, 16, 32), (1, 2, 2, 2), strict=True):
        for s in (stride, 1):
            expected += [(width, cin, 3, 3)] + bn(width) + [(width, width, 3, 3)] + bn(width)
            expected += shortcut(cin, width, s)
            cin = width
    expected += [(10, 32), (10,)]
    assert Counter(p.shape for p in model.parameters()) == Counter(expected)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
@pytest.mark.parametrize("name", ["cifarnet", "lenet"])
def test_small_net_heads_match_the_reference_n_where_it_runs(name: str, dataset: str) -> None:
    """Wherever the reference's hard-coded n = 4 is the real size, the head is nf * 4 * 4."""
    for first in (0, 1, 3, 5):
        for filter_size in (0, 1, 3):
            model = model_for(
                f"model={name}",
                f"dataset={dataset}",
                "model.nfilters=3",
                f"model.first_filter_size={first}",
                f"model.filter_size={filter_size}",
            )
            assert model.head[1].in_features == 3 * 4 * 4


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=e6_pnn_unique_masks_mix_maps", "model.nfilters=6", "masks.nmasks=3"],
        ["experiment=e8_pnn_trained_masks", "model.nfilters=6", "masks.nmasks=3"],
        ["experiment=e2_original_noiseresnet18", "model.nfilters=4"],
        ["model=lenet", "dataset=mnist", "model.nfilters=4"],
    ],
    ids=["fixed_unique_masks", "trained_shared_masks", "noiseresnet18", "lenet"],
)
def test_state_dict_round_trip(overrides: list[str]) -> None:
    model = model_for(*overrides, seed=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    restored = model_for(*overrides, seed=1)  # other masks, noise and weights
    names = [n for n, _ in model.named_parameters() if n.endswith("masks")]
    names += [n for n, _ in model.named_buffers() if n.endswith("noise")]
    assert names
    for name in names:
        assert not torch.equal(model.state_dict()[name], restored.state_dict()[name])
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    model.eval(), restored.eval()
    x = torch.randn(3, *((1, 28, 28) if "dataset=mnist" in overrides else (3, 32, 32)))
    assert torch.equal(model(x), restored(x))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (["model.filter_size=2"], r"model\.filter_size must be one of \{0, 1, 3, 5, 7\}"),
    (["model.first_filter_size=4"], r"model\.first_filter_size must be one of"),
    (["masks.nmasks=0"], r"masks\.nmasks must be >= 1"),
    (["model.nfilters=0"], r"model\.nfilters must be >= 1"),
    (["masks.nmasks=2", "model.nfilters=64"], r"masks\.nmasks=2 > 1 needs .* multiple"),
    (["model=noiseresnet18", "model.first_filter_size=0"], r"\{3, 7\} for model\.name=noise"),
    (["model.act=swish"], r"model\.act must be one of \{relu, lrelu, prelu"),
    (["model.pool_type=min"], r"model\.pool_type must be one of \{max, avg\}"),
    (["noise.type=laplace"], r"noise\.type must be one of \{uniform, normal\}"),
    (["model.name=vgg"], r"model\.name must be one of"),
    (["dataset.name=svhn"], r"dataset\.name must be one of"),
    # Ours: shapes the reference cannot run either.
    (["model.filter_size=5"], r"model\.filter_size must be one of \{0, 1, 3\} for model\.name"),
    (["model.first_filter_size=5"], r"model\.first_filter_size must be one of \{0, 1, 3, 7\}"),
    (
        ["model=cifarnet", "model.first_filter_size=7", "model.filter_size=5"],
        r"model\.filter_size must be one of \{0, 1, 3.*too small",
    ),
]


@pytest.mark.parametrize("overrides,message", CONFIG_ERRORS)
def test_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        model_for(*overrides, validate=False)
    assert isinstance(error.value, ValueError)


def test_debug_goes_to_the_first_perturbation_layer() -> None:
    model = model_for("model=cifarnet", "model.nfilters=3", "model.first_filter_size=3")
    assert not any(m.debug for m in model.modules() if isinstance(m, PerturbLayer))
    model = model_for(
        "model=cifarnet", "model.nfilters=3", "model.first_filter_size=3", "model.debug=true"
    )
    flags = [(m.filter_size, m.debug) for m in model.modules() if isinstance(m, PerturbLayer)]
    assert flags[:3] == [(3, False), (0, True), (0, False)] and sum(d for _, d in flags) == 1


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["e4_conv1x1_no_noise", "e7_pnn_shared_masks"])
def test_reference_init(experiment: str) -> None:
    model = model_for(f"experiment={experiment}")
    checked = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.numel() >= 20_000:
            k = module.kernel_size[0]
            # N(0, sqrt(2 / (k*k*out))), for grouped convs too (their fan-in is M, not in*M).
            std = math.sqrt(2 / (k * k * module.out_channels))
            assert module.weight.std().item() == pytest.approx(std, rel=0.05)
            assert abs(module.weight.mean().item()) < 4 * std / math.sqrt(module.weight.numel())
            if module.bias is not None:  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                fan_in = module.weight[0].numel()
                assert module.bias.abs().max() <= 1 / math.sqrt(fan_in)
            checked += 1
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        elif isinstance(module, nn.Linear):  # PyTorch's default
            assert module.weight.abs().max() <= 1 / math.sqrt(module.in_features)
    assert checked > 10
