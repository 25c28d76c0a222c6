"""Perturbation layers (PerturbLayer, NoiseLayer) and the fused perturbation.

A PerturbLayer with ``filter_size=0`` computes, in the reference's words,
``conv1x1(act(x.unsqueeze(2) + level * masks).view(B, C*M, H, W))``: every input channel is
fanned out into ``M`` noisy copies before a grouped 1x1 convolution sums them again. Written that
way the (B, C, M, H, W) fan-out is built in memory and kept for backward (2 x 512 MiB per layer in
experiment 6). :func:`perturb_conv` computes the same function without keeping it:

- ``M == 1``: the fan-out *is* the input; a plain 1x1 conv.
- no activation between perturbation and conv: the closed form
  ``sum_m W[o, m] * (x + level * n_m) = x * sum_m W[o, m] + level * sum_m W[o, m] * n_m``.
- on CUDA (when the fast path is on): a ``torch.compile``d sum form, one compiled kernel per shape,
  that never writes the fan-out to memory (see bench anchors: 0.68 ms and 16 MiB vs 2.9 ms and
  1.5 GiB for eager).
- otherwise (CPU, or fast path off): :class:`_ChunkedPerturbConv`, which walks over the masks in
  chunks and recomputes each chunk in backward. It saves only x, the masks and the weights.

:func:`perturb_reference` keeps the reference formulation for benchmarks and equivalence checks;
:func:`perturb_settings` switches between the ways, and :func:`check_fast_path` compares them
on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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

# Fan-out elements per chunk in the eager fused path: a few chunk-sized temporaries (4 MiB each
# in fp32) stay in a CPU's last-level cache, and the Python loop costs next to nothing.
CHUNK_ELEMENTS = 1 << 20

_settings = {"fast_path": True, "reference": False}


def make_act(name: str) -> nn.Module:
    """A fresh activation module; one instance is shared by all uses inside one layer."""
    if name not in ACTIVATIONS:
        raise ValueError(f"model.act must be one of {{{', '.join(ACTIVATIONS)}}} (got {name!r})")
    return ACTIVATIONS[name]()


def set_fast_path(enabled: bool) -> None:
    """Allow (default) or forbid the compiled CUDA path; off means eager everywhere."""
    _settings["fast_path"] = bool(enabled)


def set_reference_formulation(enabled: bool) -> None:
    """Run every perturbation the reference way (materialised fan-out), for benchmarks."""
    _settings["reference"] = bool(enabled)


@contextlib.contextmanager
def perturb_settings(
    *, fast_path: bool | None = None, reference: bool | None = None
) -> Iterator[None]:
    """Temporarily change :func:`set_fast_path` / :func:`set_reference_formulation`."""
    saved = dict(_settings)
    if fast_path is not None:
        _settings["fast_path"] = fast_path
    if reference is not None:
        _settings["reference"] = reference
    try:
        yield
    finally:
        _settings.update(saved)


def perturb_output_size(size: int, filter_size: int) -> int:
    """Spatial size after a PerturbLayer with this filter size (k = 0 keeps it)."""
    if filter_size == 0:
        return size
    padding, stride, _ = CONV_SPECS[filter_size]
    return (size + 2 * padding - filter_size) // stride + 1


# --------------------------------------------------------------------------------------------
# The perturbation followed by its 1x1 conv
# --------------------------------------------------------------------------------------------


def perturb_reference(
    x: Tensor,
    masks: Tensor,
    level: float,
    weight: Tensor,
    bias: Tensor | None,
    act: nn.Module | None,
) -> Tensor:
    """The reference formulation: broadcast add, act, view (B, C*M, H, W), grouped 1x1 conv."""
    b, c, h, w = x.shape
    m = masks.shape[2]
    z = x.unsqueeze(2) + level * masks
    if act is not None:
        z = act(z)
    return F.conv2d(z.reshape(b, c * m, h, w), weight, bias, groups=c if m > 1 else 1)


def perturb_sum_form(
    x: Tensor,
    masks: Tensor,
    level: float,
    weight: Tensor,
    bias: Tensor | None,
    act_kind: str,
    act_consts: tuple[float, ...],
    act_weight: Tensor | None,
) -> Tensor:
    """Sum over masks as one broadcast expression; under torch.compile it becomes one reduction
    kernel (recomputed in backward) with no (B, C, M, H, W) buffer. Needs M > 1."""
    b, c, h, w = x.shape
    m = masks.shape[2]
    w3 = weight.reshape(c, -1, m)  # output channel c*k + j reads input channel c
    z = _functional_act(x[:, :, None] + level * masks, act_kind, act_consts, act_weight)
    y = (z[:, :, None] * w3[None, :, :, :, None, None]).sum(3)  # (B, C, k, H, W)
    y = y.reshape(b, -1, h, w)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _functional_act(
    z: Tensor, kind: str, consts: tuple[float, ...], weight: Tensor | None
) -> Tensor:
    if kind == "none":
        return z
    if kind == "relu":
        return F.relu(z)
    if kind == "lrelu":
        return F.leaky_relu(z, consts[0])
    if kind == "prelu":
        return F.prelu(z, weight)
    if kind == "elu":
        return F.elu(z, consts[0])
    if kind == "selu":
        return F.selu(z)
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation kind {kind!r}")


def _act_spec(act: nn.Module | None) -> tuple[str, tuple[float, ...], Tensor | None] | None:
    """(kind, constants, parameter) describing a deterministic act, or None (rrelu training)."""
    if act is None:
        return "none", (), None
    if isinstance(act, nn.RReLU):
        # In eval mode RReLU is a leaky relu with the mean slope; in training it is random.
        return None if act.training else ("lrelu", ((act.lower + act.upper) / 2,), None)
    if isinstance(act, nn.LeakyReLU):
        return "lrelu", (act.negative_slope,), None
    if isinstance(act, nn.PReLU):
        return "prelu", (), act.weight
    if isinstance(act, nn.ELU):
        return "elu", (act.alpha,), None
    kinds = {nn.ReLU: "relu", nn.SELU: "selu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
    return kinds[type(act)], (), None


class _ChunkedPerturbConv(torch.autograd.Function):
    """Grouped 1x1 conv of act(x + level * masks) for M > 1, a chunk at a time.

    Layout: x as (B, C, 1, P) with P = H*W, masks as (1, Cn, M, P), the weight as (C, k, M). A
    chunk of samples and masks z = act(x + level * n) is (b, C, m, P) and adds w[:, :, m] @ z to
    y viewed as (B, C, k, P), which is already (B, out, H, W) in memory. Backward recomputes each
    chunk (replaying the RNG for rrelu) instead of keeping it; ctx keeps x, masks and weights.
    """

    @staticmethod
    def forward(ctx, x, masks, weight, bias, level, act, *act_params):
        b, c, h, w = x.shape
        m = masks.shape[2]
        x4, n, w3 = x.reshape(b, c, 1, h * w), masks.flatten(-2), weight.reshape(c, -1, m)
        random_act = isinstance(act, nn.RReLU) and act.training
        ctx.rng = _rng_state(x.device) if random_act else None
        y = x.new_empty(b, c, w3.shape[1], h * w, dtype=w3.dtype)
        # Autocast would round each chunk's matmul to bf16; the chunks are summed in full.
        with torch.autocast(x.device.type, enabled=False):
            for bs, ms in _chunks(b, c, m, h * w):
                z = act(torch.add(x4[bs], n[:, :, ms], alpha=level))  # (b, C, m, P)
                part = torch.matmul(w3[:, :, ms], z)  # (b, C, k, P)
                if ms.start == 0:
                    y[bs] = part
                else:
                    y[bs] += part
        y = y.reshape(b, -1, h, w)
        if bias is not None:
            y = y.add_(bias.view(1, -1, 1, 1))
        ctx.level, ctx.act, ctx.has_bias = level, act, bias is not None
        ctx.save_for_backward(x, masks, weight, *act_params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, masks, weight, *act_params = ctx.saved_tensors
        b, c, h, w = x.shape
        cn, m = masks.shape[1], masks.shape[2]
        level, act = ctx.level, ctx.act
        x4, n, w3 = x.reshape(b, c, 1, h * w), masks.flatten(-2), weight.reshape(c, -1, m)
        g4 = grad_y.to(w3.dtype).reshape(b, c, -1, h * w)  # (B, C, k, P)
        need_x, need_masks, need_w, need_bias = ctx.needs_input_grad[:4]
        need_params = ctx.needs_input_grad[6:]
        # act.parameters() are the leaves act(pre) uses; act_params are the same tensors.
        live = [p for p, need in zip(act.parameters(), need_params, strict=True) if need]
        grad_x = torch.zeros_like(x4[:, :, 0], dtype=w3.dtype) if need_x else None
        grad_n = torch.zeros_like(n) if need_masks else None
        grad_w = torch.zeros_like(w3) if need_w else None
        grad_live = [torch.zeros_like(p) for p in live]
        with (
            _replay_rng(ctx.rng, x.device),
            torch.enable_grad(),
            torch.autocast(x.device.type, enabled=False),
        ):
            for bs, ms in _chunks(b, c, m, h * w):  # the forward's order, for the RNG replay
                pre = torch.add(x4[bs], n[:, :, ms], alpha=level).requires_grad_()
                z = act(pre)
                if need_w:
                    grad_w[:, :, ms] += torch.matmul(g4[bs], z.detach().transpose(-1, -2)).sum(0)
                w_t = w3[:, :, ms].transpose(-1, -2)  # (C, m, k)
                # (b, C, m, P). With k = 1 an outer product: broadcasting beats a K=1 bmm.
                grad_z = g4[bs] * w_t if w_t.shape[-1] == 1 else torch.matmul(w_t, g4[bs])
                grad_pre, *grads = torch.autograd.grad(z, [pre, *live], grad_z)
                for acc, g in zip(grad_live, grads, strict=True):
                    acc += g
                if need_x:
                    grad_x[bs] += grad_pre.sum(2)
                if need_masks:  # sum over the chunk's samples, and channels if shared
                    gn = grad_pre[0] if grad_pre.shape[0] == 1 else grad_pre.sum(0)
                    grad_n[0, :, ms] += gn.sum(0, keepdim=True) if cn == 1 else gn
        live_iter = iter(grad_live)
        grad_params = [next(live_iter) if need else None for need in need_params]
        return (
            None if grad_x is None else grad_x.reshape(x.shape).to(x.dtype),
            None if grad_n is None else grad_n.mul_(level).reshape(masks.shape),
            None if grad_w is None else grad_w.reshape(weight.shape),
            grad_y.sum((0, 2, 3)) if ctx.has_bias and need_bias else None,
            None,
            None,
            *grad_params,
        )


def _chunks(b: int, c: int, m: int, p: int) -> Iterator[tuple[slice, slice]]:
    """(samples, masks) slices, masks inner. A chunk holds at most CHUNK_ELEMENTS fan-out
    elements and at most as many as the input, so backward's recompute scratch stays within
    the input's memory; except that a chunk always takes two masks (a matmul over one is very
    slow on CPU), which is at most twice the input."""
    per_mask, budget = c * p, min(CHUNK_ELEMENTS, b * c * p)
    mc = max(min(m, 2), min(m, budget // per_mask))
    bc = max(1, min(b, budget // (per_mask * mc)))
    for b0 in range(0, b, bc):
        for m0 in range(0, m, mc):
            yield slice(b0, b0 + bc), slice(m0, m0 + mc)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state, device: torch.device) -> Iterator[None]:
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


_compiled: dict[tuple, Callable] = {}
_compile_ids = itertools.count()


def _compiled_sum_form(key: tuple) -> Callable:
    """torch.compile of perturb_sum_form, one per shape key, compiled on first call.

    Dynamo keeps its cache (and its recompile limit of 8) per code object, and one model has
    more than 8 layer shapes; so each key gets its own copy of the code object.
    """
    if key not in _compiled:
        name = f"perturb_sum_form_{next(_compile_ids)}"
        code = perturb_sum_form.__code__.replace(co_name=name)
        fn = types.FunctionType(code, perturb_sum_form.__globals__, name)
        _compiled[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[key]


def perturb_conv(
    x: Tensor,
    masks: Tensor,
    level: float,
    weight: Tensor,
    bias: Tensor | None,
    act: nn.Module | None,
) -> Tensor:
    """Same value and gradients as :func:`perturb_reference`, without keeping the fan-out."""
    b, c, h, w = x.shape
    m = masks.shape[2]
    if masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the input is {h}x{w}")
    if _settings["reference"]:
        return perturb_reference(x, masks, level, weight, bias, act)
    if m == 1:  # the fan-out is the input itself
        z = x + level * masks[:, :, 0]
        return F.conv2d(z if act is None else act(z), weight, bias)
    w3 = weight.reshape(c, -1, m)
    if act is None:  # closed form: linear in the masks, no fan-out at all
        # level after the matmul: matmul then saves the masks themselves, not a scaled copy.
        noise = level * torch.matmul(w3, masks[0].flatten(-2))  # (C, k, P)
        y = x.reshape(b, c, 1, h * w) * w3.sum(2)[None, :, :, None] + noise
        y = y.reshape(b, -1, h, w)
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    spec = _act_spec(act)
    if torch.compiler.is_compiling():
        # Inside a caller's torch.compile, inductor fuses the sum form itself. rrelu's training
        # noise cannot be replayed there, so that one case runs the reference way.
        if spec is None:
            return perturb_reference(x, masks, level, weight, bias, act)
        return perturb_sum_form(x, masks, level, weight, bias, *spec)
    if spec is not None and x.is_cuda and _settings["fast_path"]:
        kind, consts, act_weight = spec
        # Everything the compiled graph specialises on, so that each key compiles once.
        key = (x.shape, masks.shape, weight.shape, x.dtype, x.device, kind, consts, level)
        key += (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        key += (x.requires_grad, masks.requires_grad, bias is None)
        return _compiled_sum_form(key)(x, masks, level, weight, bias, kind, consts, act_weight)
    return _ChunkedPerturbConv.apply(x, masks, weight, bias, level, act, *act.parameters())


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


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
        if self.mix_maps:
            self.mix_conv = nn.Conv2d(out_channels, out_channels, 1)
            self.mix_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.filter_size > 0:
            return self.act(self.bn(self.conv(x)))
        act = self.act if self.use_act else None
        y = perturb_conv(x, self.masks, self.level, self.conv.weight, self.conv.bias, act)
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
    is a buffer, so checkpoints keep it (the original created it lazily and lost it).
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


# --------------------------------------------------------------------------------------------
# Equivalence check for a GPU machine
# --------------------------------------------------------------------------------------------

# (in_channels, out_channels, size, nmasks, unique_masks, train_masks, act).
README_CASES = [
    (128, 128, 32, 64, True, False, "relu"),  # e6, stage 1
    (128, 256, 32, 64, True, False, "relu"),  # e6, first layer of stage 2 (out = 2 * in)
    (128, 128, 32, 64, False, False, "relu"),  # e7
    (128, 128, 32, 64, False, True, "relu"),  # e8
]
# Then every other activation on a smaller layer (each compiles its own kernels: minutes).
FAST_PATH_CASES = README_CASES + [
    (64, 128, 16, 8, True, True, act) for act in ACTIVATIONS if act != "relu"
]


def check_fast_path(
    device: str = "cuda", batch: int = 16, rtol: float = 1e-4, cases: list[tuple] | None = None
) -> list[dict]:
    """Run each case (default FAST_PATH_CASES) three ways on ``device``, forward and backward:
    the reference formulation, the eager fused path and the fast path (compiled on CUDA).
    Returns one row per case and way: the largest relative error of output and gradients
    against the reference (TF32 off), milliseconds per step and peak extra MiB. Raises
    AssertionError past ``rtol``. rrelu runs in eval mode (each way draws training noise in
    its own order)."""
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for case in FAST_PATH_CASES if cases is None else cases:
            rows += _check_case(torch.device(device), batch, *case)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    bad = [row for row in rows if row["max_rel_error"] > rtol]
    assert not bad, f"fast path differs from the reference formulation: {bad}"
    return rows


def _check_case(device, batch, cin, cout, size, nmasks, unique, train, act_name) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen).to(device).requires_grad_()
    masks = torch.rand(1, cin if unique else 1, nmasks, size, size, generator=gen) * 2 - 1
    masks = nn.Parameter(masks.to(device), requires_grad=train)
    conv = nn.Conv2d(cin * nmasks, cout, 1, groups=cin).to(device)
    act = make_act(act_name).to(device).eval()
    grad_out = torch.randn(batch, cout, size, size, generator=gen).to(device)
    leaves = [x, conv.weight, conv.bias, *([masks] if train else []), *act.parameters()]

    def step() -> list[Tensor]:
        y = perturb_conv(x, masks, 0.5, conv.weight, conv.bias, act)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]

    rows, reference = [], None
    for way in ("reference", "eager", "fast"):
        with perturb_settings(reference=way == "reference", fast_path=way == "fast"):
            results = step()  # on the fast path, this call compiles
            reference = reference or results
            _sync(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, repeats = time.perf_counter(), 5
            for _ in range(repeats):
                step()
            _sync(device)
            ms = (time.perf_counter() - start) / repeats * 1e3
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
        error = max(
            ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            for a, b in zip(results, reference, strict=True)
        )
        case = f"{cin}->{cout} {size}x{size} M{nmasks} {'unique' if unique else 'shared'}"
        case += f"{' trained' if train else ''} {act_name}"
        rows.append(
            {"case": case, "way": way, "max_rel_error": error, "ms": ms, "peak_mib": peak / 2**20}
        )
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
