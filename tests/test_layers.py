"""PerturbLayer and NoiseLayer against the reference formulation, written out again here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnn.config import load_config
from pnn.model import fused, layers
from pnn.model.fused import FusedSettings, perturb_conv
from pnn.model.layers import ACTIVATIONS, NoiseLayer, PerturbLayer, use_fused
from pnn.model.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import layer_paths  # noqa: E402

RTOL = 1e-5  # fp32, relative to the norm of the reference's tensor


def rel_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class ReferencePerturbLayer(nn.Module):
    """The reference's filter_size=0 PerturbLayer: broadcast add, act, view (B, C*M, H, W),
    grouped 1x1 conv, BN, act, optional mix_maps. Same parameter names as ours."""

    def __init__(self, cin, cout, size, nmasks, level, unique, train, use_act, act, mix_maps):
        super().__init__()
        self.level, self.use_act, self.mix_maps = level, use_act, mix_maps
        masks = torch.empty(1, cin if unique else 1, nmasks, size, size).uniform_(-1, 1)
        self.masks = nn.Parameter(masks, requires_grad=train)
        self.act = ACTIVATIONS[act]()
        self.conv = nn.Conv2d(cin * nmasks, cout, 1, groups=cin if nmasks > 1 else 1)
        self.bn = nn.BatchNorm2d(cout)
        if mix_maps:
            self.mix_conv = nn.Conv2d(cout, cout, 1)
            self.mix_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = x.unsqueeze(2) + self.masks * self.level
        if self.use_act:
            y = self.act(y)
        y = y.view(x.shape[0], -1, x.shape[2], x.shape[3])
        y = self.act(self.bn(self.conv(y)))
        if self.mix_maps:
            y = self.act(self.mix_bn(self.mix_conv(y)))
        return y


# (in, out, size, nmasks, unique, train_masks, mix_maps)
CASES = [
    (4, 4, 5, 1, True, True, False),  # M = 1, in = out
    (4, 8, 5, 1, False, True, True),  # M = 1, out = 2 in, shared, mix_maps
    (4, 4, 5, 6, True, True, False),  # M > 1, in = out, unique, trained
    (4, 8, 5, 6, False, True, True),  # M > 1, out = 2 in, shared, trained, mix_maps
    (4, 8, 5, 6, True, False, True),  # fixed unique masks
    (3, 6, 4, 19, False, False, False),  # a first layer, 3 -> 6
]


def run_both(case, act: str, use_act: bool, rrelu_train: bool):
    cin, cout, size, nmasks, unique, train, mix = case
    torch.manual_seed(0)
    ours = PerturbLayer(
        cin,
        cout,
        input_size=size,
        nmasks=nmasks,
        level=0.7,
        unique_masks=unique,
        train_masks=train,
        use_act=use_act,
        act=act,
        mix_maps=mix,
    )
    with torch.no_grad():  # move every parameter off its default, masks included
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ref = ReferencePerturbLayer(cin, cout, size, nmasks, 0.7, unique, train, use_act, act, mix)
    ref.load_state_dict(ours.state_dict())
    if act == "rrelu" and not rrelu_train:
        ours.act.eval(), ref.act.eval()
    x = torch.randn(3, cin, size, size)
    grad_out = torch.randn(3, cout, size, size)
    results = []
    for layer in (ours, ref):
        torch.manual_seed(1)  # the same rrelu noise for both, where they draw it alike
        xi = x.clone().requires_grad_()
        y = layer(xi)
        params = dict(layer.named_parameters())
        leaves = [xi, *(p for p in params.values() if p.requires_grad)]
        names = ["input", *(n for n, p in params.items() if p.requires_grad)]
        results.append(
            dict(
                zip(["output", *names], [y, *torch.autograd.grad(y, leaves, grad_out)], strict=True)
            )
        )
    return results


def layer_cases():
    for case in CASES:
        for act in ACTIVATIONS:
            for use_act in (False, True):
                # Only M > 1 with an act between perturbation and conv runs in chunks.
                for chunked in (False, True) if case[3] > 1 and use_act else (False,):
                    name = "in{}_out{}_s{}_M{}_u{:d}_t{:d}_mix{:d}".format(*case)
                    name += f"-{act}-{'use_act' if use_act else 'no_act'}"
                    name += "-many_chunks" if chunked else ""
                    yield pytest.param(case, act, use_act, chunked, id=name)


@pytest.mark.parametrize("case,act,use_act,chunked", list(layer_cases()))
def test_layer_matches_reference(case, act, use_act, chunked, monkeypatch) -> None:
    if chunked:  # chunks of one sample and two masks
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 16)
    else:  # the whole fan-out in one chunk
        monkeypatch.setattr(fused, "_chunks", lambda b, c, m, p: [(slice(0, b), slice(0, m))])
    # rrelu trains with random slopes: matched seeds give both the same slopes only when ours
    # draws them in the reference's order, i.e. in one chunk.
    ours, ref = run_both(case, act, use_act, rrelu_train=not chunked)
    assert ours.keys() == ref.keys()
    if case[5]:
        assert "masks" in ours
    for name in ref:
        if name.endswith("conv.bias"):
            # Training-mode BN right after the conv removes its bias: both gradients are zero
            # up to rounding, so a relative error means nothing.
            assert ours[name].abs().max() < 1e-4 and ref[name].abs().max() < 1e-4
        else:
            assert rel_error(ours[name], ref[name]) <= RTOL, name


def test_rrelu_training_noise_is_replayed_in_backward(monkeypatch) -> None:
    """Many chunks, random slopes: backward must see the slopes forward drew (gradcheck)."""
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 8)
    act = nn.RReLU().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    masks = (
        torch.rand(1, 3, 10, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    ).requires_grad_()
    weight = torch.randn(6, 10, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)

    def seeded(x, masks, weight, bias):
        torch.manual_seed(0)
        return perturb_conv(x, masks, 0.5, weight, bias, act)

    assert not torch.equal(seeded(x, masks, weight, bias), seeded(x, masks, weight, bias) * 0)
    assert torch.autograd.gradcheck(seeded, (x, masks, weight, bias))


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a != "rrelu"] + [None])
@pytest.mark.parametrize("cout,unique", [(4, True), (8, False)])
def test_sum_form_matches_reference(act, cout, unique) -> None:
    """The expression the CUDA fast path compiles, checked here uncompiled."""
    torch.manual_seed(0)
    act_module = None if act is None else layers.make_act(act)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    masks = nn.Parameter(torch.rand(1, 4 if unique else 1, 6, 5, 5) * 2 - 1)
    conv = nn.Conv2d(4 * 6, cout, 1, groups=4)
    leaves = [x, masks, conv.weight, conv.bias]
    spec = fused._act_spec(act_module)
    grad_out = torch.randn(2, cout, 5, 5)
    got = fused.perturb_sum_form(x, masks, 0.5, conv.weight, conv.bias, *spec)
    want = fused.perturb_reference(x, masks, 0.5, conv.weight, conv.bias, act_module)
    for a, b in zip(
        [got, *torch.autograd.grad(got, leaves, grad_out)],
        [want, *torch.autograd.grad(want, leaves, grad_out)],
        strict=True,
    ):
        assert rel_error(a, b) <= RTOL


# --------------------------------------------------------------------------------------------
# The fan-out is never saved for backward
# --------------------------------------------------------------------------------------------


def saved_tensor_ratios(model: nn.Module, batch: int) -> list[tuple[str | None, float, bool]]:
    """One training step. For every tensor autograd saves: the perturbation layer (PerturbLayer
    with filter_size 0) it is saved in, or None; its size over that layer's input B*C*H*W (over
    the largest such input when saved elsewhere); and whether it is a parameter's storage."""
    stack: list[tuple[str, int]] = []

    def enter(name: str, args: tuple) -> None:  # hooks return None: a value would replace data
        stack.append((name, args[0].numel()))

    def leave() -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, PerturbLayer) and module.filter_size == 0:
            pre = module.register_forward_pre_hook(lambda m, args, name=name: enter(name, args))
            post = module.register_forward_hook(lambda m, args, out: leave())
            handles += [pre, post]
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    records: list[tuple[str | None, int, int | None, bool]] = []

    def pack(tensor: Tensor) -> Tensor:
        layer, size = stack[-1] if stack else (None, None)
        is_param = tensor.untyped_storage().data_ptr() in param_storages
        records.append((layer, tensor.numel(), size, is_param))
        return tensor

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))
    try:
        # Backward inside the hooks too: what our backward recomputes is checked as well.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            F.cross_entropy(model(x), target).backward()
    finally:
        for handle in handles:
            handle.remove()
    largest = max(size for _, _, size, _ in records if size is not None)
    return [(layer, n / (size or largest), p) for layer, n, size, p in records]


@pytest.mark.slow  # a full-size e6 step on CPU
def test_experiment6_step_saves_no_fanout() -> None:
    cfg = load_config(["experiment=e6_pnn_unique_masks_mix_maps"])
    assert cfg.train.batch_size == 16 and cfg.model.nfilters == 128
    torch.manual_seed(0)
    model = build_model(cfg)
    with use_fused(model, FusedSettings(compiled=False, reference=False)):
        ratios = saved_tensor_ratios(model, batch=cfg.train.batch_size)
    # The fan-out would be 64x. Parameters reach exactly 4x at batch 16: the masks (64 masks per
    # input pixel of 16 samples) and stage 4's 1024x1024 mix_maps weight. They cost no memory.
    assert max(ratio for _, ratio, _ in ratios) <= 4
    # Activations: at most a layer's output (2x its input when it doubles the width).
    assert max(ratio for _, ratio, is_param in ratios if not is_param) <= 2


@pytest.mark.slow  # the reference formulation keeps a 64x fan-out of an e6
def test_saved_tensor_check_catches_the_reference_formulation() -> None:
    """The same check fails when the layers run the reference way (a narrower e6, for speed)."""
    cfg = load_config(["experiment=e6_pnn_unique_masks_mix_maps", "model.nfilters=4"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with use_fused(model, FusedSettings(reference=False)):
        assert max(ratio for _, ratio, _ in saved_tensor_ratios(model, batch=16)) <= 4
    with use_fused(model, FusedSettings(reference=True)):
        ratios = saved_tensor_ratios(model, batch=16)
    # The reference keeps (B, C, M, H, W) for its act and the grouped conv: 64x the input.
    over = {(layer, ratio) for layer, ratio, _ in ratios if ratio > 4}
    perturbing = {
        name
        for name, m in model.named_modules()
        if isinstance(m, PerturbLayer) and m.filter_size == 0  # the stem is a 3x3 conv
    }
    assert over == {(name, 64.0) for name in perturbing}


# --------------------------------------------------------------------------------------------
# Switches, NoiseLayer, debug printing, representation
# --------------------------------------------------------------------------------------------


def test_settings_restore_and_reference_switch() -> None:
    """use_fused sets every PerturbLayer's settings for the block only (also when it raises),
    and each layer gets its own back."""
    model = nn.Sequential(
        PerturbLayer(3, 6, input_size=4, nmasks=2), PerturbLayer(6, 6, input_size=4, nmasks=2)
    )
    model[1].fused = FusedSettings(compiled=False)
    before = [m.fused for m in model]
    assert before == [FusedSettings(compiled=True, reference=False), FusedSettings(False, False)]
    with use_fused(model, FusedSettings(compiled=False, reference=True)):
        assert [m.fused for m in model] == [FusedSettings(compiled=False, reference=True)] * 2
        assert PerturbLayer(3, 6, input_size=4).fused == FusedSettings()  # others untouched
    assert [m.fused for m in model] == before
    with pytest.raises(RuntimeError), use_fused(model, FusedSettings(reference=True)):
        raise RuntimeError
    assert [m.fused for m in model] == before


def test_masks_must_match_the_input_size() -> None:
    layer = PerturbLayer(3, 6, input_size=8, nmasks=2)
    with pytest.raises(ValueError, match="masks are"):
        layer(torch.randn(1, 3, 7, 7))


def test_noise_layer() -> None:
    torch.manual_seed(0)
    layer = NoiseLayer(4, 6, input_size=5, level=0.3)
    assert layer.noise.shape == (4, 5, 5) and not layer.noise.requires_grad
    assert "noise" in layer.state_dict() and "noise" not in dict(layer.named_parameters())
    assert layer.noise.abs().max() <= 0.3 and layer.noise.abs().max() > 0.25
    x = torch.randn(2, 4, 5, 5)
    want = layer.conv(layer.bn(torch.relu(x + layer.noise)))
    assert torch.equal(layer(x), want)
    assert "input_size=5, level=0.3" in repr(layer)


def test_debug_prints_input_masks_perturbed_and_output(capsys) -> None:
    layer = PerturbLayer(3, 6, input_size=4, nmasks=2, level=0.5, debug=True)
    x = torch.randn(2, 3, 4, 4)
    layer(x)
    out = capsys.readouterr().out
    for word in ("input [2, 3, 4, 4] image1 channel1", "masks", "perturbed image0 channel0 mask1"):
        assert word in out
    expected = round((x[1, 1, 0, 0] + 0.5 * layer.masks[0, 1, 1, 0, 0]).item(), 5)
    assert f"perturbed image1 channel1 mask1: [{expected}" in out


def test_extra_repr() -> None:
    layer = PerturbLayer(4, 8, input_size=6, nmasks=3, unique_masks=False, mix_maps=True)
    text = repr(layer)
    assert "4, 8, filter_size=0, input_size=6, nmasks=3" in text and "mix_maps=True" in text
    assert "train_masks=False" in text and "unique_masks=False" in text
    assert repr(PerturbLayer(4, 8, input_size=6, filter_size=3)).count("nmasks") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fast_path_matches_reference() -> None:
    # The README's layer shapes and prelu (a parameter inside the compiled graph); the other
    # activations compile for minutes: bench/layer_paths.py --all runs them all. Raises past 1e-4.
    prelu = (64, 128, 16, 8, True, True, "prelu")
    rows = layer_paths.check_fast_path("cuda", cases=[*layer_paths.README_CASES, prelu])  # 1e-4
    for row in rows:
        print(row)
    fast = {r["case"]: r for r in rows if r["way"] == "fast"}
    reference = {r["case"]: r for r in rows if r["way"] == "reference"}
    # The README shapes (M = 64): the compiled sum form keeps no fan-out, the reference does.
    assert all(fast[c]["peak_mib"] < reference[c]["peak_mib"] for c in fast if " M64 " in c)
