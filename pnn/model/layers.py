"""The perturbation layers: PerturbLayer and NoiseLayer, and the activations they use.

A PerturbLayer with ``filter_size=0`` perturbs its input with fixed noise masks and mixes the
noisy copies with a 1x1 conv; that perturbation is computed by :func:`pnn.model.fused.perturb_conv`,
in the way its :class:`~pnn.model.fused.FusedSettings` says (each layer carries its own;
:func:`use_fused` sets them for a whole model inside a block).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnn.model.fused import FusedSettings, perturb_conv

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # Out-of-place versions of the reference's activations: same functions, safe for autograd.
    "relu": nn.ReLU,
    "lrelu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# (padding, stride, bias) of a PerturbLayer with filter_size k > 0, as in the reference.
CONV_SPECS: dict[int, tuple[int, int, bool]] = {
    1: (0, 1, True),
    3: (1, 1, False),
    5: (1, 1, False),
    7: (3, 2, False),
}


def make_act(name: str) -> nn.Module:
    """A fresh activation module; one instance is shared by all uses inside one layer."""
    if name not in ACTIVATIONS:
        raise ValueError(f"model.act must be one of {{{', '.join(ACTIVATIONS)}}} (got {name!r})")
    return ACTIVATIONS[name]()


def perturb_output_size(size: int, filter_size: int) -> int:
    """Spatial size after a PerturbLayer with this filter size (k = 0 keeps it)."""
    if filter_size == 0:
        return size
    padding, stride, _ = CONV_SPECS[filter_size]
    return (size + 2 * padding - filter_size) // stride + 1


class PerturbLayer(nn.Module):
    """The reference's PerturbLayer.

    ``filter_size > 0``: Conv2d(k) -> BN -> act. ``filter_size == 0``: perturb each input channel
    with ``nmasks`` fixed (or trained) noise masks, optionally act, then a 1x1 conv (grouped by
    input channel when nmasks > 1) -> BN -> act, and with ``mix_maps`` a second 1x1 conv -> BN ->
    act. ``self.act`` is one module used at every activation of the layer (one prelu weight).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        input_size: int,
        filter_size: int = 0,
        nmasks: int = 1,
        level: float = 0.5,
        unique_masks: bool = True,
        train_masks: bool = False,
        noise_type: str = "uniform",
        use_act: bool = False,
        act: str = "relu",
        mix_maps: bool = False,
        debug: bool = False,
    ) -> None:
        super().__init__()
        if filter_size not in (0, *CONV_SPECS):
            raise ValueError(f"filter_size must be one of {{0, 1, 3, 5, 7}} (got {filter_size})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size, self.filter_size, self.nmasks = input_size, filter_size, nmasks
        self.level, self.unique_masks, self.noise_type = level, unique_masks, noise_type
        self.use_act, self.mix_maps, self.debug = use_act, mix_maps and filter_size == 0, debug
        self.act = make_act(act)
        if filter_size > 0:
            padding, stride, bias = CONV_SPECS[filter_size]
            self.conv = nn.Conv2d(
                in_channels, out_channels, filter_size, stride=stride, padding=padding, bias=bias
            )
        else:
            if nmasks > 1 and out_channels % in_channels != 0:
                raise ValueError(
                    f"nmasks={nmasks} > 1 needs out_channels ({out_channels}) to be a multiple of "
                    f"in_channels ({in_channels})"
                )
            shape = (1, in_channels if unique_masks else 1, nmasks, input_size, input_size)
            masks = torch.empty(shape)
            if noise_type == "uniform":
                masks.uniform_(-1, 1)
            elif noise_type == "normal":
                masks.normal_()
            else:
                raise ValueError(f"noise_type must be uniform or normal (got {noise_type!r})")
            # A parameter even when fixed, so that state_dict carries it and .to() moves it.
            self.masks = nn.Parameter(masks, requires_grad=train_masks)
            groups = in_channels if nmasks > 1 else 1
            self.conv = nn.Conv2d(in_channels * nmasks, out_channels, 1, groups=groups)
        self.bn = nn.BatchNorm2d(out_channels)
        # How perturb_conv computes (a plain attribute: not in state_dict, not a module).
        self.fused = FusedSettings()
        if self.mix_maps:
            self.mix_conv = nn.Conv2d(out_channels, out_channels, 1)
            self.mix_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.filter_size > 0:
            return self.act(self.bn(self.conv(x)))
        act = self.act if self.use_act else None
        y = perturb_conv(
            x, self.masks, self.level, self.conv.weight, self.conv.bias, act, self.fused
        )
        y = self.act(self.bn(y))
        if self.mix_maps:
            y = self.act(self.mix_bn(self.mix_conv(y)))
        if self.debug:
            self._print_values(x, y)
        return y

    @torch.no_grad()
    def _print_values(self, x: Tensor, y: Tensor, n: int = 2) -> None:
        """The reference's --debug print: a few values of the input, the masks, the perturbed
        input (computed here for those few values only) and the output."""
        nb, nc, nm = min(2, x.shape[0]), min(2, x.shape[1]), min(2, self.nmasks)

        def row(t: Tensor) -> str:
            return str([round(v, 5) for v in t[:n].tolist()])

        lines = [f"{self.extra_repr()}"]
        for b, c in itertools.product(range(nb), range(nc)):
            lines.append(f"input {list(x.shape)} image{b} channel{c}: {row(x[b, c, 0])}")
        for c, m in itertools.product(range(min(nc, self.masks.shape[1])), range(nm)):
            lines.append(
                f"masks {list(self.masks.shape)} channel{c} mask{m}: {row(self.masks[0, c, m, 0])}"
            )
        for b, c, m in itertools.product(range(nb), range(nc), range(nm)):
            noise = self.masks[0, c if self.unique_masks else 0, m, 0]
            perturbed = row(x[b, c, 0, :n] + self.level * noise[:n])
            lines.append(f"perturbed image{b} channel{c} mask{m}: {perturbed}")
        for b, c in itertools.product(range(nb), range(min(2, y.shape[1]))):
            lines.append(f"output {list(y.shape)} image{b} channel{c}: {row(y[b, c, 0])}")
        print("\n".join(lines), flush=True)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, filter_size={self.filter_size}"
        if self.filter_size > 0:
            return s
        s += f", input_size={self.input_size}, nmasks={self.nmasks}, level={self.level}"
        s += f", unique_masks={self.unique_masks}, train_masks={self.masks.requires_grad}"
        s += f", noise_type={self.noise_type}, use_act={self.use_act}, mix_maps={self.mix_maps}"
        return s


class NoiseLayer(nn.Module):
    """The original authors' noise layer: x + n -> relu -> BN(in) -> conv1x1(in -> out, bias).

    n has the input's (C, H, W) shape, is drawn once from U[-level, level] and never trained. It
    is a buffer, so ``state_dict()`` and our checkpoints hold it. (The original created it lazily
    as a plain attribute: ``torch.save(model)``, which the reference uses, keeps it, but its
    ``state_dict()`` does not.)
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, input_size: int, level: float
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size, self.level = input_size, level
        noise = torch.empty(in_channels, input_size, input_size).uniform_(-level, level)
        self.register_buffer("noise", noise)
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(F.relu(x + self.noise)))

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}"
        return s + f", input_size={self.input_size}, level={self.level}"


@contextlib.contextmanager
def use_fused(model: nn.Module, settings: FusedSettings) -> Iterator[None]:
    """Run every PerturbLayer of ``model`` with ``settings`` inside the block; each layer's own
    settings are back afterwards, also after an exception."""
    perturbing = [m for m in model.modules() if isinstance(m, PerturbLayer)]
    saved = [layer.fused for layer in perturbing]
    for layer in perturbing:
        layer.fused = settings
    try:
        yield
    finally:
        for layer, own in zip(perturbing, saved, strict=True):
            layer.fused = own
