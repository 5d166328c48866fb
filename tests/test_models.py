"""The reference GLNet: the authors' checkpoint layout, forward/backward, backends, slot maps, timm.

Big variants are only ever built on the meta device (no memory, no init); everything that runs
uses tiny configurations covering every block type and downsampling style.
"""

import hashlib
import sys
import types

import pytest
import torch
from torch import nn

import glmix_kernels
from glmix_kernels import reference
from glmix_kernels.backends import BACKENDS
from glmix_kernels.models import (
    GLMixBlock,
    GLNet,
    GLNetTokenLabeling,
    create_model,
    glnet,
    list_models,
    load_checkpoint,
    register_with_timm,
)

# Parameter counts of the authors' code with 1000 classes (docs/math.md#glnet-family).
PARAM_COUNTS = {
    "glnet_stl": 30_296_786,
    "glnet_stl_paramslot": 30_481_106,
    "glnet_4g": 27_001_593,
    "glnet_9g": 60_010_617,
    "glnet_16g": 106_055_161,
    "glnet_4g_tklb": 27_514_593,
    "glnet_9g_tklb": 60_779_617,
}

# sha256 of the state dict layout ("name shape dtype" per entry, in order) of the authors' models,
# computed from their code: any renamed, reordered, reshaped or missing entry changes it.
LAYOUT_SHA256 = {
    "glnet_stl": "98d5f5394d502d55ea2667af3fb6e082ca3000264fd4b68895476599e7f6bf87",
    "glnet_stl_paramslot": "de2f13f3ed60b2206fc1b0342e4e9e1d2bf3ae0b9ababc77af9526359cdffaf5",
    "glnet_4g": "f7b38ba84b49e3ab67e5ca215d9d4afa61dab538e61e5bf3df96d36b72106520",
    "glnet_9g": "7afda02f3d8a5c0cecadd31c70c97a030a1b96f2fa49492a071a3c53feac1a0a",
    "glnet_16g": "0f530e6ab68f0471ecf7b7309dd1d5eb14d462eb96e175bf3ef2084ee6c284dc",
    "glnet_4g_tklb": "a02e5b24c8fd627d78089179e6307adc754c74ffae9b95d340da0cd7b5b298c7",
    "glnet_9g_tklb": "84a8800657fcff6ae2269944b4777329fd6e458ed3d98f6bfe7aaf7ef64620ec",
}

# Tiny models with every block type: the 4G/9G/16G family's layout (overlapped downsampling, conv
# position embedding, hybrid and attention NCHW stages, layer scale) and the STL one
# (non-overlapped, token-layout attention stage, learned slots; 9 slots is not a square).
TINY = {
    "hybrid": dict(
        depth=(1, 1, 2, 1),
        embed_dim=(32, 32, 64, 64),
        mlp_ratios=(2, 2, 2, 2),
        head_dim=32,
        norm_layer=nn.BatchNorm2d,
        mixing_modes=("glmix", "glmix", "glmix.mha_nchw", "mha_nchw"),
        slot_init="ada_avgpool",
        num_slots=16,
        cpe_ks=3,
        downsample_style="ovlp",
        mlp_dw=True,
        layerscale=0.5,
        num_classes=10,
    ),
    "stl": dict(
        depth=(1, 1, 1, 1),
        embed_dim=(32, 32, 64, 64),
        mlp_ratios=(2, 2, 2, 2),
        head_dim=32,
        norm_layer=nn.BatchNorm2d,
        mixing_modes=("glmix", "glmix", "glmix", "mha"),
        slot_init="param",
        num_slots=9,
        transition_layout="norm.proj",
        num_classes=10,
    ),
}


def tiny(kind, seed=0, cls=GLNet, **kw):
    torch.manual_seed(seed)
    model = cls(**{**TINY[kind], **kw})
    # Random BatchNorm statistics and temperatures, so eval mode and the softmaxes are not trivial.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.normal_(0, 0.2)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("slot_scale"):
                t.fill_(6.0)
    return model


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


# ---------------------------------------------------------------- the authors' checkpoint layout


def test_list_models():
    assert list_models() == list(PARAM_COUNTS)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_state_dict_layout_matches_authors(name):
    layout = "\n".join(f"{k} {tuple(t.shape)} {t.dtype}" for k, t in meta_model(name).state_dict().items())
    assert hashlib.sha256(layout.encode()).hexdigest() == LAYOUT_SHA256[name]


# A few names and shapes from the authors' code per family (readable evidence next to the hashes);
# None: must be absent.
KEYS = {
    "glnet_stl": {
        "downsample_layers.0.0.weight": (96, 3, 4, 4),  # 4x4 patchify stem
        "downsample_layers.1.0.running_mean": (96,),  # norm before the transition conv
        "downsample_layers.1.1.weight": (192, 96, 2, 2),
        "stages.0.blocks.0.slot_scale": (),
        "stages.0.blocks.0.relation_mha.in_proj_weight": (288, 96),
        "stages.0.blocks.0.feature_conv.1.weight": (96, 1, 5, 5),
        "stages.0.blocks.0.norm1.weight": (96,),
        "stages.0.blocks.0.norm1.running_mean": None,  # block norms are LayerNorm2d, not the stage's BN
        "stages.0.blocks.0.mlp.3.weight": (96, 384, 1, 1),
        "stages.0.blocks.0.init_slots": None,
        "stages.0.blocks.0.pos_conv.weight": None,
        "stages.3.blocks.1.mha_op.out_proj.weight": (768, 768),
        "stages.3.blocks.1.mlp.2.weight": (768, 3072),
        "norm.running_var": (768,),
        "head.weight": (1000, 768),
    },
    "glnet_stl_paramslot": {"stages.2.blocks.5.init_slots": (1, 64, 384)},
    "glnet_4g": {
        "downsample_layers.0.1.weight": (32, 3, 3, 3),  # index 0 is the (absent) input norm
        "downsample_layers.0.2.num_batches_tracked": (),
        "downsample_layers.0.4.weight": (64, 32, 3, 3),
        "downsample_layers.1.0.weight": (128, 64, 3, 3),  # conv before the norm
        "downsample_layers.1.1.running_var": (128,),
        "stages.0.blocks.0.pos_conv.weight": (64, 1, 3, 3),
        "stages.0.blocks.0.mlp.1.weight": (192, 1, 3, 3),  # the residual depthwise conv
        "stages.2.blocks.0.slot_scale": (),
        "stages.2.blocks.1.slot_scale": None,  # odd blocks of the hybrid stage are attention blocks
        "stages.2.blocks.1.mha_op.in_proj_weight": (768, 256),
        "stages.2.blocks.1.norm1.weight": (256,),
        "stages.3.blocks.3.pos_conv.weight": (512, 1, 3, 3),
        "stages.0.blocks.0.ls1.gamma": None,
    },
    "glnet_16g": {
        "stages.0.blocks.0.ls1.gamma": (1, 128, 1, 1),
        "stages.3.blocks.0.ls1.gamma": (1024,),  # added in token layout
        "stages.3.blocks.0.ls2.gamma": (1, 1024, 1, 1),
    },
    "glnet_4g_tklb": {"tklb_aux_head.weight": (1000, 512), "tklb_aux_head.bias": (1000,)},
}


@pytest.mark.parametrize("name", list(KEYS))
def test_state_dict_key_spot_checks(name):
    sd = meta_model(name).state_dict()
    for key, shape in KEYS[name].items():
        if shape is None:
            assert key not in sd, key
        else:
            assert key in sd and tuple(sd[key].shape) == shape, key


def test_variant_overrides_and_errors():
    model = meta_model("glnet_4g", num_classes=7, drop_path_rate=0.1)
    assert model.head.out_features == 7
    assert model.stages[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown GLNet variant"):
        create_model("glnet_1g")
    with pytest.raises(ValueError, match="drop_rate"):
        meta_model("glnet_4g", drop_rate=0.1)
    with pytest.raises(ValueError, match="backend"):
        meta_model("glnet_4g", backend="gpu")


def test_state_dict_round_trip_and_load_checkpoint(tmp_path):
    x = images()
    source = tiny("hybrid", seed=0).eval()
    want = source(x)
    sd = source.state_dict()
    for i, payload in enumerate(({"model": sd, "epoch": 3}, {"model_ema": sd}, sd)):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(payload, path)
        fresh = tiny("hybrid", seed=1).eval()
        assert not torch.equal(fresh(x), want)
        assert load_checkpoint(fresh, path) is fresh
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)

    # Both present: "model" unless `key` picks the EMA weights.
    ema = tiny("hybrid", seed=2).state_dict()
    torch.save({"model": sd, "model_ema": ema}, tmp_path / "both.pth")
    fresh = tiny("hybrid", seed=1)
    load_checkpoint(fresh, tmp_path / "both.pth")
    assert torch.equal(fresh.head.weight, sd["head.weight"])
    load_checkpoint(fresh, tmp_path / "both.pth", key="model_ema")
    assert torch.equal(fresh.head.weight, ema["head.weight"])


@pytest.mark.parametrize("change", ["rename", "missing", "extra"])
def test_load_is_strict(tmp_path, change):
    sd = dict(tiny("hybrid").state_dict())
    if change == "rename":
        sd["stages.0.blocks.0.temperature"] = sd.pop("stages.0.blocks.0.slot_scale")
    elif change == "missing":
        del sd["norm.running_mean"]
    else:
        sd["stages.0.blocks.0.init_slots"] = torch.zeros(1, 16, 32)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        load_checkpoint(tiny("hybrid"), tmp_path / "bad.pth")


# ---------------------------------------------------------------- the GLMix block


def eager_glmix_block(block, x):
    """docs/math.md#glmix-block written out with the reference ops: what the block must compute."""
    if block.slot_init == "ada_avgpool":
        s0 = nn.functional.adaptive_avg_pool2d(x, block.pool_size).flatten(2).transpose(1, 2)
    else:
        s0 = block.init_slots
    x = x + block.pos_conv(x) if block.with_conv_pos_emb else x
    y = block.norm1(x)
    pixels = y.flatten(2).transpose(1, 2).contiguous()
    slots = reference.soft_cluster(pixels, s0, block.slot_scale)
    slots = block.relation_mha(slots, slots, slots, need_weights=False)[0]
    g = reference.soft_dispatch(pixels, s0, block.slot_scale, slots).transpose(1, 2).reshape(y.shape)
    x = x + block.ls1(g + block.feature_conv(y))
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("kind", list(TINY))
def test_glmix_block_matches_spec(kind):
    model = tiny(kind).eval()
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 32, 12, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(block(x), eager_glmix_block(block, x), rtol=1e-5, atol=1e-5)


def test_glmix_block_calls_public_ops_on_its_norm1_map(monkeypatch):
    model = tiny("hybrid").eval().set_backend("reference")
    glmix_blocks = [m for m in model.modules() if isinstance(m, GLMixBlock)]
    norm1_maps, calls = [], []
    for b in glmix_blocks:
        b.norm1.register_forward_hook(lambda m, args, out: norm1_maps.append(out))

    def spy(op):
        def wrapped(x, *args, backend):
            calls.append((x, backend))
            return op(x, *args, backend=backend)

        return wrapped

    monkeypatch.setattr(glnet, "soft_cluster", spy(glmix_kernels.soft_cluster))
    monkeypatch.setattr(glnet, "soft_dispatch", spy(glmix_kernels.soft_dispatch))
    with torch.no_grad():
        model(images())
    assert len(calls) == 2 * len(norm1_maps) == 2 * len(glmix_blocks) == 6
    for i, (x, backend) in enumerate(calls):
        y = norm1_maps[i // 2]
        view = y.flatten(2).transpose(1, 2)
        # The (B, L, C) view of the norm1 map itself, not a copy.
        assert x.data_ptr() == y.data_ptr() and x.stride() == view.stride() and torch.equal(x, view)
        assert backend == "reference"


def test_set_backend_reaches_every_glmix_block():
    model = meta_model("glnet_4g")
    blocks = [m for m in model.modules() if isinstance(m, GLMixBlock)]
    assert len(blocks) == 4 + 4 + 9 and all(b.backend == "auto" for b in blocks)
    assert model.set_backend("reference") is model
    assert all(b.backend == "reference" for b in blocks)
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fastest")
    assert all(b.backend == "reference" for b in blocks)


# ---------------------------------------------------------------- forward and backward


def forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", list(TINY))
def test_forward_backward_finite(kind, mode):
    model = tiny(kind, drop_path_rate=0.2).train(mode == "train")
    out, dx, grads = forward_backward(model, images())
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
    # The temperature learns through both fused ops.
    assert all(b.slot_scale.grad != 0 for b in model.modules() if isinstance(b, GLMixBlock))


def test_activation_checkpointing_changes_nothing():
    x = images()
    plain = forward_backward(tiny("hybrid"), x)
    ckpt = forward_backward(tiny("hybrid", use_checkpoint_stages=(0, 1, 2, 3)), x)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=0, atol=0)
    for name, g in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], g, rtol=0, atol=0, msg=name)


FUSED_CPU = [n for n, b in BACKENDS.items() if b.load is not None and "cpu" in b.device_types]


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("kind", list(TINY))
def test_fused_backend_matches_reference(kind, backend):
    if backend not in glmix_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available on CPU here")
    # Eval mode: in train mode a conv bias feeding a BatchNorm has an exactly-zero gradient, which
    # leaves only rounding noise to compare.
    model = tiny(kind).eval()
    x = images(size=32)  # small: the Triton backend runs in its interpreter on CPU
    want = forward_backward(model.set_backend("reference"), x)
    got = forward_backward(model.set_backend(backend), x)

    def close(a, b, what):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{what}: normwise error {err:.2e}"

    close(got[0], want[0], "output")
    close(got[1], want[1], "input gradient")
    for name, g in want[2].items():
        close(got[2][name], g, name)


# ---------------------------------------------------------------- slot-assignment maps


@pytest.mark.parametrize(
    "kind,stage,block,shape",
    [
        ("hybrid", 0, 0, (2, 16, 16, 16)),
        ("hybrid", 2, 0, (2, 16, 4, 4)),
        ("stl", -3, -1, (2, 9, 8, 8)),  # learned, non-square slots; negative indices
    ],
)
def test_slot_assignment_maps(kind, stage, block, shape):
    model = tiny(kind).eval()
    x = images()
    maps = model.slot_assignment_maps(x, stage, block)
    assert maps.shape == shape and not maps.requires_grad
    torch.testing.assert_close(maps.sum(1), torch.ones(shape[0], *shape[2:]))
    # The same as the block's own computation on its input, captured from a normal forward.
    target = model.stages[stage].blocks[block]
    seen = []
    handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(maps, target.slot_assignment(seen[0]))


def test_slot_assignment_maps_rejects_attention_blocks():
    model = tiny("hybrid").eval()
    with pytest.raises(ValueError, match="MHSANCHWBlock, not a GLMixBlock"):
        model.slot_assignment_maps(images(), 2, 1)
    with pytest.raises(IndexError):
        model.slot_assignment_maps(images(), 0, 5)


# ---------------------------------------------------------------- token labeling


def test_token_labeling_forward(monkeypatch):
    model = tiny("hybrid", cls=GLNetTokenLabeling)
    x = images(batch=3)

    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x).flatten(2).transpose(1, 2)
        want = model.head(tokens.mean(1)) + 0.5 * model.tklb_aux_head(tokens).max(1)[0]
        torch.testing.assert_close(model(x), want)

    # Training: a box covering the whole grid swaps every image with its batch mirror; the image
    # logits come out mirrored, the token logits un-mixed back to the original order.
    model.train()
    monkeypatch.setattr(model, "_cutmix_box", lambda rows, cols: (0, 0, 0, 0))
    logits, token_logits, box = model(x)
    assert logits.shape == (3, 10) and token_logits.shape == (3, 4, 10) and box == (0, 0, 0, 0)
    monkeypatch.setattr(model, "_cutmix_box", lambda rows, cols: (0, 0, rows, cols))
    mixed_logits, mixed_tokens, box = model(x)
    assert box == (0, 0, 2, 2)
    torch.testing.assert_close(mixed_logits, logits.flip(0))
    torch.testing.assert_close(mixed_tokens, token_logits)


def test_cutmix_box_stays_on_the_grid():
    model = tiny("hybrid", cls=GLNetTokenLabeling)
    torch.manual_seed(0)
    boxes = [model._cutmix_box(7, 5) for _ in range(200)]
    assert all(0 <= r1 <= r2 <= 7 and 0 <= c1 <= c2 <= 5 for r1, c1, r2, c2 in boxes)
    assert len(set(boxes)) > 20  # random, and not always empty


# ---------------------------------------------------------------- timm


def test_timm_registration():
    timm = pytest.importorskip("timm")
    assert set(list_models()) <= set(timm.list_models("glnet*"))
    with torch.device("meta"):
        model = timm.create_model("glnet_4g_tklb", num_classes=5)
    assert isinstance(model, GLNetTokenLabeling) and model.tklb_aux_head.out_features == 5
    with pytest.raises(ValueError, match="no weights are downloaded"):
        timm.create_model("glnet_4g", pretrained=True)


def test_timm_entrypoints_with_a_stand_in_timm(monkeypatch):
    registered = {}
    fake = types.ModuleType("timm.models")
    fake.register_model = lambda fn: registered.setdefault(fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.models", fake)
    assert register_with_timm() is True
    assert list(registered) == list_models()
    # What timm.create_model passes: its factory arguments, then the model keywords.
    with torch.device("meta"):
        model = registered["glnet_stl_paramslot"](
            pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, num_classes=3
        )
    assert isinstance(model, GLNet) and model.head.out_features == 3
    assert model.stages[0].blocks[0].init_slots.shape == (1, 64, 96)
    with pytest.raises(ValueError, match="no weights are downloaded"):
        registered["glnet_4g"](pretrained=True)


def test_no_timm_no_registration(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    monkeypatch.setitem(sys.modules, "timm.models", None)
    assert register_with_timm() is False
