"""The reference's five architectures and :func:`build_model`.

Every model traces its feature-map size while it is built, so each mask and noise buffer gets
the real resolution of its input, and a combination whose shapes cannot fit (a residual whose
main path shrinks below its shortcut, a map that shrinks to nothing) is a ConfigError at build
time instead of a shape error at the first forward. Where the reference hard-codes a size (the
n x n input of cifarnet's and lenet's head), we use the traced size: it equals the reference's
number in every configuration the reference can run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from pnn.config import DATASETS, FILTER_SIZES, ConfigError, DatasetSpec, validate_model_options
from pnn.model.layers import CONV_SPECS, NoiseLayer, PerturbLayer, make_act, perturb_output_size

STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2  # ResNet-18: [2, 2, 2, 2]


class _ShapeError(Exception):
    """Raised while building when feature maps cannot fit; build_model turns it into ConfigError."""


def _conv_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise _ShapeError(f"a {size}x{size} map is too small for a {kernel}x{kernel} window")
    return out


class ResidualBlock(nn.Module):
    """relu(body(x) + shortcut(x)), out of place (the reference's in-place add breaks autograd)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + residual)


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, average pool over the final map, linear."""

    def __init__(
        self, stem: nn.Module, stages: nn.Module, final_size: int, width: int, classes: int
    ) -> None:
        super().__init__()
        self.stem, self.stages = stem, stages
        # The reference's AvgPool2d(4 or 1, stride 1): its kernel is always the final map size.
        self.pool = nn.AvgPool2d(final_size, stride=1)
        self.linear = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.pool(self.stages(self.stem(x))).flatten(1))


class SmallNet(nn.Module):
    """cifarnet / lenet: a body of perturbation layers and pools, then the reference's head."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


# A block builder maps (in_channels, out_channels, stride, input size) to (body, output size).
BlockBuilder = Callable[[int, int, int, int], tuple[nn.Module, int]]


def _stages(nfilters: int, size: int, block: BlockBuilder) -> tuple[nn.Sequential, int]:
    stages, cin = [], nfilters
    for index, stage_stride in enumerate(STAGE_STRIDES):
        cout, blocks = nfilters * 2**index, []
        for stride in (stage_stride,) + (1,) * (BLOCKS_PER_STAGE - 1):
            body, out_size = block(cin, cout, stride, size)
            shortcut = None
            if stride != 1 or cin != cout:
                shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )
            if out_size != _conv_size(size, 1, stride):
                raise _ShapeError(
                    f"stage {index + 1}: the block's main path gives {out_size}x{out_size} but "
                    f"its shortcut {_conv_size(size, 1, stride)}x{_conv_size(size, 1, stride)}"
                )
            blocks.append(ResidualBlock(body, shortcut))
            cin, size = cout, out_size
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), size


@dataclass
class _Perturbs:
    """The perturbation settings a whole model shares; builds its PerturbLayers and pools."""

    first_filter_size: int
    filter_size: int
    level: float
    first_level: float  # level * noise.scale
    use_act: bool  # the first layer's; every later layer uses its act
    pool_type: str
    nmasks: int
    unique_masks: bool
    train_masks: bool
    noise_type: str
    act: str
    mix_maps: bool
    debug: bool

    def first(self, cin: int, cout: int, size: int) -> tuple[PerturbLayer, int]:
        return self._layer(cin, cout, size, self.first_filter_size, self.first_level, self.use_act)

    def inner(self, cin: int, cout: int, size: int) -> tuple[PerturbLayer, int]:
        return self._layer(cin, cout, size, self.filter_size, self.level, True)

    def pool(self, kernel: int, stride: int, padding: int = 0) -> nn.Module:
        cls = nn.MaxPool2d if self.pool_type == "max" else nn.AvgPool2d
        return cls(kernel, stride, padding)

    def _layer(
        self, cin: int, cout: int, size: int, filter_size: int, level: float, use_act: bool
    ) -> tuple[PerturbLayer, int]:
        # Like the reference, only one layer prints: here the first that perturbs.
        debug = self.debug and filter_size == 0
        if debug:
            self.debug = False
        out = perturb_output_size(size, filter_size)
        if out < 1:
            raise _ShapeError(
                f"a {size}x{size} map is too small for a {filter_size}x{filter_size} filter"
            )
        layer = PerturbLayer(
            cin,
            cout,
            input_size=size,
            filter_size=filter_size,
            nmasks=self.nmasks,
            level=level,
            unique_masks=self.unique_masks,
            train_masks=self.train_masks,
            noise_type=self.noise_type,
            use_act=use_act,
            act=self.act,
            mix_maps=self.mix_maps,
            debug=debug,
        )
        return layer, out


def _conv_stem(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """conv (no bias) -> BN -> relu: 3x3 keeps the size, 7x7 has stride 2 (as PerturbLayer)."""
    padding, stride, _ = CONV_SPECS[kernel]
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def resnet18(in_channels: int, image_size: int, classes: int, nfilters: int) -> ResNet:
    """The baseline: 3x3 stem and standard BasicBlocks."""

    def block(cin: int, cout: int, stride: int, size: int) -> tuple[nn.Module, int]:
        body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        return body, _conv_size(size, 3, stride, 1)

    stem = _conv_stem(in_channels, nfilters, 3)
    stages, size = _stages(nfilters, image_size, block)
    return ResNet(stem, stages, size, 8 * nfilters, classes)


def noiseresnet18(
    in_channels: int,
    image_size: int,
    classes: int,
    nfilters: int,
    first_filter_size: int,
    level: float,
) -> ResNet:
    """The original authors' model: conv stem, NoiseBasicBlocks (noise buffers, never trained)."""
    nf = nfilters
    stem = _conv_stem(in_channels, nf, first_filter_size)
    size = image_size
    if first_filter_size == 7:
        stem.append(nn.MaxPool2d(3, 2, 1))
        size = _conv_size(_conv_size(image_size, 7, 2, 3), 3, 2, 1)

    def block(cin: int, cout: int, stride: int, size: int) -> tuple[nn.Module, int]:
        layers: list[nn.Module] = [NoiseLayer(cin, cout, input_size=size, level=level)]
        if stride > 1:  # MaxPool2d(1, 1) is the identity
            layers.append(nn.MaxPool2d(stride, stride))
            size = _conv_size(size, stride, stride)
        layers += [
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            NoiseLayer(cout, cout, input_size=size, level=level),
            nn.BatchNorm2d(cout),
        ]
        return nn.Sequential(*layers), size

    stages, size = _stages(nf, size, block)
    return ResNet(stem, stages, size, 8 * nf, classes)


def perturb_resnet18(
    in_channels: int, image_size: int, classes: int, nfilters: int, perturbs: _Perturbs
) -> ResNet:
    """PerturbLayer stem (+ MaxPool after a 7x7), PerturbBasicBlocks: P -> pool(stride) -> P."""
    first, size = perturbs.first(in_channels, nfilters, image_size)
    stem: nn.Module = first
    if perturbs.first_filter_size == 7:
        stem = nn.Sequential(first, nn.MaxPool2d(3, 2, 1))
        size = _conv_size(size, 3, 2, 1)

    def block(cin: int, cout: int, stride: int, size: int) -> tuple[nn.Module, int]:
        layer, size = perturbs.inner(cin, cout, size)
        layers: list[nn.Module] = [layer]
        if stride > 1:  # pool(1, 1) is the identity
            layers.append(perturbs.pool(stride, stride))
            size = _conv_size(size, stride, stride)
        layer, size = perturbs.inner(cout, cout, size)
        return nn.Sequential(*layers, layer), size

    stages, size = _stages(nfilters, size, block)
    return ResNet(stem, stages, size, 8 * nfilters, classes)


def small_net(
    name: str,
    in_channels: int,
    image_size: int,
    classes: int,
    nfilters: int,
    dropout: float,
    perturbs: _Perturbs,
) -> SmallNet:
    """cifarnet (6 perturbation layers, head width 256) or lenet (3 layers, head width 128)."""
    layer, size = perturbs.first(in_channels, nfilters, image_size)
    body: list[nn.Module] = [layer]
    # After the first layer: P = PerturbLayer(nf -> nf, filter_size), '-' = pool(3, 2, 1).
    plan, linear = {"cifarnet": ("P-PP-PP-", 256), "lenet": ("-P-P-", 128)}[name]
    for step in plan:
        if step == "P":
            layer, size = perturbs.inner(nfilters, nfilters, size)
            body.append(layer)
        else:
            body.append(perturbs.pool(3, 2, 1))
            size = _conv_size(size, 3, 2, 1)
    # The reference hard-codes n = 5 if filter_size == 5 else 4 here; n is the real map size.
    head = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(nfilters * size * size, linear),
        nn.BatchNorm1d(linear),
        make_act(perturbs.act),
        nn.Dropout(dropout),
        nn.Linear(linear, classes),
    )
    return SmallNet(nn.Sequential(*body), head)


def init_weights(module: nn.Module) -> None:
    """The reference's init: conv weights ~ N(0, sqrt(2 / (k*k*out))), BatchNorm2d 1 and 0."""
    if isinstance(module, nn.Conv2d):
        fan = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _build(m: DictConfig, noise: DictConfig, masks: DictConfig, spec: DatasetSpec) -> nn.Module:
    common = (spec.in_channels, spec.image_size, spec.num_classes, m.nfilters)
    if m.name == "resnet18":
        return resnet18(*common)
    if m.name == "noiseresnet18":
        return noiseresnet18(*common, m.first_filter_size, noise.level)
    perturbs = _Perturbs(
        first_filter_size=m.first_filter_size,
        filter_size=m.filter_size,
        level=noise.level,
        first_level=noise.level * noise.scale,
        use_act=m.use_act,
        pool_type=m.pool_type,
        nmasks=masks.nmasks,
        unique_masks=masks.unique,
        train_masks=masks.train,
        noise_type=noise.type,
        act=m.act,
        mix_maps=masks.mix_maps,
        debug=m.debug,
    )
    if m.name == "perturb_resnet18":
        return perturb_resnet18(*common, perturbs)
    return small_net(m.name, *common, m.dropout, perturbs)


def _fits(
    m: DictConfig, noise: DictConfig, masks: DictConfig, spec: DatasetSpec, **change: int
) -> bool:
    """Whether the model builds with some model keys changed; built on the meta device (free)."""
    m = OmegaConf.merge(m, change)  # a new config; the caller's stays as it is
    try:
        with torch.device("meta"):
            _build(m, noise, masks, spec)
    except _ShapeError:
        return False
    return True


def _shape_error(cfg: DictConfig, spec: DatasetSpec, detail: str) -> ConfigError:
    m, noise, masks = cfg.model, cfg.noise, cfg.masks
    where = f"model.name={m.name} on {spec.image_size}x{spec.image_size} inputs"
    for key in ("filter_size", "first_filter_size"):
        allowed = [f for f in FILTER_SIZES if _fits(m, noise, masks, spec, **{key: f})]
        if allowed:
            shown = ", ".join(map(str, allowed))
            return ConfigError(
                f"model.{key} must be one of {{{shown}}} for {where} with the other settings "
                f"(got {m[key]}): {detail}"
            )
    return ConfigError(
        f"model.first_filter_size={m.first_filter_size} and model.filter_size={m.filter_size} "
        f"do not fit {where}: {detail}"
    )


def build_model(cfg: DictConfig, init: bool = True) -> nn.Module:
    """The model ``cfg`` describes, initialised as the reference does unless ``init`` is false
    (a model built on the meta device to check shapes or sizes has no values to initialise, and
    initialising one imports ``torch._dynamo``, which a dry run need not pay for)."""
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(
            f"dataset.name must be one of {{{', '.join(DATASETS)}}} (got {cfg.dataset.name!r})"
        )
    spec = DATASETS[cfg.dataset.name]
    m = cfg.model
    validate_model_options(
        name=m.name,
        first_filter_size=m.first_filter_size,
        filter_size=m.filter_size,
        nmasks=cfg.masks.nmasks,
        nfilters=m.nfilters,
        in_channels=spec.in_channels,
        act=m.act,
        pool_type=m.pool_type,
        noise_type=cfg.noise.type,
    )
    try:
        model = _build(m, cfg.noise, cfg.masks, spec)
    except _ShapeError as error:
        raise _shape_error(cfg, spec, str(error)) from None
    if init:
        model.apply(init_weights)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts as the reference table reports them.

    - ``params``: every parameter except PerturbLayer masks.
    - ``mask_values``: elements of the PerturbLayer masks, plus noiseresnet18's fixed noise
      buffers (the reference created those lazily and did not count them; they are the same kind
      of fixed per-position noise, so we do).
    - ``trainable``: parameters with requires_grad, masks included when they are trained.
    """
    perturbs = [mod for mod in model.modules() if isinstance(mod, PerturbLayer)]
    mask_ids = {id(mod.masks) for mod in perturbs if mod.filter_size == 0}
    params = sum(p.numel() for p in model.parameters() if id(p) not in mask_ids)
    mask_values = sum(p.numel() for p in model.parameters() if id(p) in mask_ids)
    mask_values += sum(mod.noise.numel() for mod in model.modules() if isinstance(mod, NoiseLayer))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "mask_values": mask_values, "trainable": trainable}
