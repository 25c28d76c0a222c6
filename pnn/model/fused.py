"""The fused perturbation: ``conv1x1(act(x + level * masks))`` computed without keeping the fan-out.

The reference computes ``conv1x1(act(x.unsqueeze(2) + level * masks).view(B, C*M, H, W))``,
building and keeping for backward a (B, C, M, H, W) fan-out. :func:`perturb_conv` computes the
same function without keeping it:

- ``M == 1``: a plain 1x1 conv; no activation: the closed form
  ``x * sum_m W[o, m] + level * sum_m W[o, m] * n_m``;
- on CUDA, when :class:`FusedSettings` allows it: a ``torch.compile``d sum form that never
  writes the fan-out to memory;
- otherwise :class:`_ChunkedPerturbConv`: chunks of masks, recomputed in backward.

:func:`perturb_reference` keeps the reference formulation for ``bench/layer_paths.py`` and the
equivalence checks. Each PerturbLayer carries its :class:`FusedSettings`; nothing is global.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Fan-out elements per chunk in the eager fused path: a few chunk-sized temporaries (4 MiB each
# in fp32) stay in a CPU's last-level cache, and the Python loop costs next to nothing.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class FusedSettings:
    """How :func:`perturb_conv` may compute: ``compiled`` allows the ``torch.compile``d kernel on
    CUDA (off: the eager chunked path everywhere); ``reference`` runs the reference formulation
    (materialised fan-out) instead, for benchmarks and equivalence checks."""

    compiled: bool = True
    reference: bool = False


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
    settings: FusedSettings | None = None,
) -> Tensor:
    """Same value and gradients as :func:`perturb_reference`, without keeping the fan-out;
    ``settings`` (default: :class:`FusedSettings()`) chooses the way."""
    settings = settings or FusedSettings()
    b, c, h, w = x.shape
    m = masks.shape[2]
    if masks.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the input is {h}x{w}")
    if settings.reference:
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
    if spec is not None and x.is_cuda and settings.compiled:
        kind, consts, act_weight = spec
        # Everything the compiled graph specialises on, so that each key compiles once.
        key = (x.shape, masks.shape, weight.shape, x.dtype, x.device, kind, consts, level)
        key += (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        key += (x.requires_grad, masks.requires_grad, bias is None)
        return _compiled_sum_form(key)(x, masks, level, weight, bias, kind, consts, act_weight)
    return _ChunkedPerturbConv.apply(x, masks, weight, bias, level, act, *act.parameters())
