"""GLNet as a dense-prediction backbone: timm's multi-scale interface, any input size, timm's
model conventions, and the same through timm itself when it imports."""

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import glmix_kernels
from _helpers import FUSED, TOL
from glmix_kernels.models import GLMixBlock, GLNetFeatures, create_model
from glmix_kernels.models._timm import _import_timm_register_model
from test_models import TINY, forward_backward, tiny


def image(h, w, batch=2, seed=1):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def staged(model, x):
    """Every stage's output, by running the stages by hand."""
    outs = []
    for down, stage in zip(model.downsample_layers, model.stages):
        x = stage(down(x))
        outs.append(x)
    return outs


# ---------------------------------------------------------------- forward_intermediates


@pytest.mark.parametrize("kind", list(TINY))
def test_forward_intermediates_are_the_stage_outputs(kind):
    model = tiny(kind).eval()
    x = image(70, 97)
    with torch.no_grad():
        want = staged(model, x)
        final, maps = model.forward_intermediates(x)
        logits = model(x)
    assert len(maps) == 4
    for i, (got, ref) in enumerate(zip(maps, want)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"stage {i}")
    torch.testing.assert_close(final, model.norm(want[-1]), rtol=0, atol=0)
    torch.testing.assert_close(model.head(final.mean((2, 3))), logits, rtol=0, atol=0)


def test_forward_intermediates_strides_and_channels():
    model = tiny("hybrid").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(image(64, 96), intermediates_only=True)
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info] == [32, 32, 64, 64]
    assert [(m.shape[2], m.shape[3]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in range(4)]


@pytest.mark.parametrize("indices,picked", [(None, [0, 1, 2, 3]), (2, [2, 3]), ([0, -1], [0, 3]), ((1,), [1])])
def test_forward_intermediates_indices(indices, picked):
    model = tiny("hybrid").eval()
    x = image(48, 40)
    with torch.no_grad():
        want = staged(model, x)
        maps = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        early = model.forward_intermediates(x, indices=indices, stop_early=True)[1]
    assert len(maps) == len(picked) == len(early)
    for got, e, i in zip(maps, early, picked):
        torch.testing.assert_close(got, want[i], rtol=0, atol=0)
        torch.testing.assert_close(e, want[i], rtol=0, atol=0)


def test_forward_intermediates_norm_applies_to_the_last_stage_only():
    model = tiny("hybrid").eval()
    x = image(40, 40)
    with torch.no_grad():
        want = staged(model, x)
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
    torch.testing.assert_close(maps[2], want[2], rtol=0, atol=0)
    torch.testing.assert_close(maps[3], model.norm(want[3]), rtol=0, atol=0)


def test_forward_intermediates_bad_arguments():
    model = tiny("hybrid")
    x = image(32, 32)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=5)
    with pytest.raises(IndexError):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=[])


def test_prune_intermediate_layers():
    model = tiny("hybrid").eval()
    x = image(40, 56)
    with torch.no_grad():
        want = staged(model, x)
    assert model.prune_intermediate_layers([0, 2]) == [0, 2]
    assert len(model.stages) == len(model.downsample_layers) == len(model.feature_info) == 3
    assert isinstance(model.head, torch.nn.Identity) and isinstance(model.norm, torch.nn.Identity)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    torch.testing.assert_close(maps[1], want[2], rtol=0, atol=0)
    # The parameter names stay the authors': a pruned model loads its part of a full checkpoint.
    full = tiny("hybrid").state_dict()
    model.load_state_dict({k: v for k, v in full.items() if k in model.state_dict()}, strict=True)


# ---------------------------------------------------------------- features_only


def test_features_only_model():
    model = create_model("glnet_4g", features_only=True, out_indices=(0, 1, 2, 3))
    assert isinstance(model, GLNetFeatures)
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert not any(k.startswith(("model.head", "model.norm")) for k in model.state_dict())
    short = create_model("glnet_stl", features_only=True, out_indices=(-2,))
    assert short.feature_info.channels() == [384] and len(short.model.stages) == 3


def test_features_only_outputs_equal_the_classifiers_stages():
    full = tiny("stl").eval()
    features = GLNetFeatures(copy.deepcopy(full), out_indices=(1, 3)).eval()
    x = image(96, 64)
    with torch.no_grad():
        want = staged(full, x)
        got = features(x)
    assert [g.shape for g in got] == [want[1].shape, want[3].shape]
    for g, w in zip(got, (want[1], want[3])):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------- any input size

SIZES = [(97, 131), (45, 33)]  # odd, not multiples of 32, landscape and portrait


@pytest.mark.parametrize("backend", [b for b in FUSED if "cpu" in glmix_kernels.backends.BACKENDS[b].device_types])
@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_size_fused_equals_reference(size, kind, backend):
    why = glmix_kernels.backends.why_unavailable(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend!r} on cpu: {why}")
    features = GLNetFeatures(tiny(kind).eval(), (0, 1, 2, 3))
    x = image(*size, batch=1)
    # Against the fp64 reference: the fused fp32 error stays within a few times the fp32
    # reference's own (a temperature's gradient sums thousands of cancelling terms).
    exact = features_backward(copy.deepcopy(features).double().set_backend("reference"), x.double())
    ref = features_backward(features.set_backend("reference"), x)
    got = features_backward(features.set_backend(backend), x)
    for name, want in exact.items():
        e_ref, e_got = normwise(ref[name], want), normwise(got[name], want)
        floor = TOL[torch.float32] if want.dim() else 5 * TOL[torch.float32]  # 0-d: one cancelling sum
        assert e_got <= max(4 * e_ref, floor), f"{name}: {e_got:.2e} (reference fp32: {e_ref:.2e})"


def normwise(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def features_backward(features, x):
    """Every stage map, the input gradient and every parameter gradient of a sum over the maps."""
    x = x.clone().requires_grad_(True)
    features.zero_grad(set_to_none=True)
    maps = features(x)
    g = torch.Generator().manual_seed(3)
    sum(m.mul(torch.randn(m.shape, generator=g)).sum() for m in maps).backward()
    out = {f"map {i}": m.detach() for i, m in enumerate(maps)}
    out["input gradient"] = x.grad
    out.update({n: p.grad for n, p in features.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("size", [(512, 683)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_detection_sizes_glnet_4g_cpu_forward(size):
    if glmix_kernels.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    model = create_model("glnet_4g", features_only=True).eval()
    x = image(*size, batch=1)
    with torch.no_grad():
        got = model.set_backend("cpu")(x)
        want = model.set_backend("reference")(x)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape[2:] == tuple(math.ceil(s / 2 ** (i + 2)) for s in size)
        err = ((g - w).abs().max() / w.abs().max()).item()
        assert err < 1e-4, f"stage {i}: normwise error {err:.2e}"


def test_sizes_the_stem_cannot_take():
    stl = tiny("stl")
    with pytest.raises(ValueError, match="at least 32x32"):
        stl(image(31, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        stl.forward_intermediates(image(64, 20))
    assert stl(image(32, 45)).shape == (2, 10)  # the patchify stem drops the border, as the authors'
    hybrid = tiny("hybrid")
    assert hybrid(image(1, 3)).shape == (2, 10)  # the padded overlapping stem takes any size
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        hybrid(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        hybrid(torch.randn(1, 4, 32, 32))


def authors_adaptive_pool(x, out):
    """The adaptive average pooling the authors' slot initialisation runs, written out: output
    cell i averages rows floor(i H / out) .. ceil((i + 1) H / out) - 1 (overlapping, or repeating
    rows when H < out), likewise for columns."""
    H, W = x.shape[2:]
    rows = [(i * H // out, -(-(i + 1) * H // out)) for i in range(out)]
    cols = [(j * W // out, -(-(j + 1) * W // out)) for j in range(out)]
    cells = [x[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, dim=1)  # (B, out * out, C), row-major like flatten(2)


@pytest.mark.parametrize("hw", [(56, 56), (13, 7), (5, 3), (25, 38), (1, 2)])
def test_slot_initialisation_is_the_authors_pooling(hw):
    block = GLMixBlock(16, 1, num_slots=64).eval()
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    _, _, _, init_slots = block.double()._mixer_inputs(x)
    torch.testing.assert_close(init_slots, authors_adaptive_pool(x, 8), rtol=1e-12, atol=1e-12)
    # And what their code calls, literally: adaptive_avg_pool2d, then (B, S, C) row-major.
    torch.testing.assert_close(
        init_slots, F.adaptive_avg_pool2d(x, 8).permute(0, 2, 3, 1).flatten(1, 2), rtol=0, atol=0
    )
    # Under torch.export the same cells are averaged by products with pooling matrices (sizes
    # stay symbolic); the means agree to rounding.
    with mock.patch.object(torch.compiler, "is_exporting", return_value=True):
        _, _, _, exported = block._mixer_inputs(x)
    torch.testing.assert_close(exported, init_slots, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- timm's model conventions


def test_set_grad_checkpointing_changes_nothing():
    x = image(40, 56)
    plain = forward_backward(tiny("hybrid"), x)
    model = tiny("hybrid")
    model.set_grad_checkpointing(True)
    assert all(s.use_checkpoint for s in model.stages)
    ckpt = forward_backward(model, x)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    for name, g in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], g, rtol=0, atol=0, msg=name)
    model.set_grad_checkpointing(False)
    assert not any(s.use_checkpoint for s in model.stages)


def test_classifier_conventions():
    model = tiny("hybrid")
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == set()
    model.reset_classifier(7, global_pool="avg")
    assert model(image(32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(image(32, 32)).shape == (2, 64)  # pooled features
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="max")


def test_pretrained_cfg():
    model = create_model("glnet_4g")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.head
    stl = create_model("glnet_stl")
    assert stl.get_submodule(stl.pretrained_cfg["first_conv"]).in_channels == 3


# ---------------------------------------------------------------- through timm


@pytest.fixture(scope="module")
def timm():
    try:
        _import_timm_register_model()
    except ImportError as e:
        pytest.skip(f"timm is not installed ({e}); `pip install -e .[timm]`")
    import timm

    return timm


def test_timm_features_only(timm):
    model = timm.create_model("glnet_4g", features_only=True, out_indices=(1, 2, 3), depth=[1, 1, 2, 1]).eval()
    assert model.feature_info.channels() == [128, 256, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        maps = model(image(97, 131, batch=1))
    assert [tuple(m.shape) for m in maps] == [(1, 128, 13, 17), (1, 256, 7, 9), (1, 512, 4, 5)]


def test_timm_resolve_data_config(timm):
    model = timm.create_model("glnet_9g")
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 0.875
    timm.data.create_transform(**cfg)  # what an evaluation script builds from it


def test_timm_optimizer_and_checkpointing(timm):
    from timm.optim import create_optimizer_v2

    model = timm.create_model("glnet_stl", num_classes=3, depth=[1, 1, 1, 1])
    model.set_grad_checkpointing()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    scales = [b.slot_scale for b in model.modules() if isinstance(b, GLMixBlock)]
    assert scales and not any(id(s) in decayed for s in scales)  # 0-d: never decayed
    model(image(64, 64)).sum().backward()
    opt.step()
