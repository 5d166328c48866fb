"""GLNet, the GLMix backbone, with the global branch running on this package's fused ops.

Module, parameter and buffer names follow the authors' ``rayleizhu/GLMix`` (``models/glnet.py``,
``models/glnet_tklb.py``) exactly, so their released checkpoints load with ``strict=True``; that is
why some index-sensitive ``nn.Sequential`` layouts keep placeholder ``nn.Identity`` entries.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import reference, soft_cluster, soft_dispatch
from ..backends import check_name

MIXING_MODES = ("mha", "mha_nchw", "glmix", "glmix.mha_nchw")

# What timm.data.resolve_data_config reads: the authors trained at 224 with ImageNet's mean and std.
_PRETRAINED_CFG = dict(
    url="",
    input_size=(3, 224, 224),
    pool_size=(7, 7),
    crop_pct=0.875,
    interpolation="bicubic",
    fixed_input_size=False,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    classifier="head",
)


def _check_backend(name):
    # Availability depends on the tensors' device, so only the name is checked here; the ops
    # themselves say at call time when a backend cannot run.
    return check_name(name)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch, rescaling the kept ones."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def _drop_path(p):
    # The authors use nn.Identity for a zero rate; keeping that makes the module tree identical.
    return DropPath(p) if p > 0.0 else nn.Identity()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``: eps 1e-6)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel residual scale; ``gamma`` is ``(C,)`` for tokens, ``(1, C, 1, 1)`` for maps."""

    def __init__(self, chans, init_value=1e-4, in_format="nlc"):
        super().__init__()
        if in_format not in ("nlc", "nchw"):
            raise ValueError(f"in_format must be 'nlc' or 'nchw', got {in_format!r}")
        shape = (chans,) if in_format == "nlc" else (1, chans, 1, 1)
        self.gamma = nn.Parameter(torch.full(shape, float(init_value)))

    def forward(self, x):
        return self.gamma * x


def _layer_scale(chans, init_value, in_format):
    # A non-positive init value means "no layer scale" in the authors' configs.
    return LayerScale(chans, init_value, in_format) if init_value > 0 else nn.Identity()


class ResDWConvNCHW(nn.Conv2d):
    """Depthwise conv with its own residual: ``x + dwconv(x)``."""

    def __init__(self, dim, ks=3):
        super().__init__(dim, dim, ks, 1, padding=ks // 2, bias=True, groups=dim)

    def forward(self, x):
        return x + super().forward(x)


def _conv_mlp(dim, mlp_ratio, mlp_dw):
    hidden = int(mlp_ratio * dim)
    # Index 1 stays an Identity without the depthwise conv, so the second conv is always `mlp.3`.
    return nn.Sequential(
        nn.Conv2d(dim, hidden, kernel_size=1),
        ResDWConvNCHW(hidden, ks=3) if mlp_dw else nn.Identity(),
        nn.GELU(),
        nn.Conv2d(hidden, dim, kernel_size=1),
    )


def _pos_conv(dim, cpe_ks):
    return nn.Conv2d(dim, dim, kernel_size=cpe_ks, padding=cpe_ks // 2, groups=dim)


def _self_attention(mha, x):
    return mha(query=x, key=x, value=x, need_weights=False)[0]


# The authors' attention blocks cast the LayerNorm output to the residual's dtype in eval mode, an
# apex workaround; without autocast the dtypes already agree, and under autocast the attention's
# input projection casts anyway, so that cast changes no value and is left out here.


class MHSABlock(nn.Module):
    """Pre-norm transformer block on ``(B, L, C)`` tokens (the authors' ``MHSA_Block``)."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        mlp_ratio=4.0,
        drop_path=0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        layerscale=-1,
    ):
        super().__init__()
        hidden = int(mlp_ratio * embed_dim)
        self.norm1 = norm_layer(embed_dim)
        self.mha_op = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = norm_layer(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.drop_path = _drop_path(drop_path)
        self.ls1 = _layer_scale(embed_dim, layerscale, "nlc")
        self.ls2 = _layer_scale(embed_dim, layerscale, "nlc")

    def forward(self, x):
        x = x + self.drop_path(self.ls1(_self_attention(self.mha_op, self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class MHSANCHWBlock(nn.Module):
    """Transformer block on NCHW maps (the authors' ``MHSA_NCHW_Block``): conv position embedding,
    token attention, then a conv MLP on the map."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        mlp_ratio=4.0,
        drop_path=0.0,
        norm_layer=LayerNorm2d,
        mlp_dw=False,
        cpe_ks=0,
        layerscale=-1,
    ):
        super().__init__()
        self.with_conv_pos_emb = cpe_ks > 0
        if self.with_conv_pos_emb:
            self.pos_conv = _pos_conv(embed_dim, cpe_ks)
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mha_op = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = norm_layer(embed_dim)
        self.mlp = _conv_mlp(embed_dim, mlp_ratio, mlp_dw)
        self.drop_path = _drop_path(drop_path)
        # The attention residual is added in token layout, the MLP one on the map.
        self.ls1 = _layer_scale(embed_dim, layerscale, "nlc")
        self.ls2 = _layer_scale(embed_dim, layerscale, "nchw")

    def forward(self, x):
        if self.with_conv_pos_emb:
            x = x + self.pos_conv(x)
        shape = x.shape
        tokens = x.permute(0, 2, 3, 1).flatten(1, 2)
        tokens = tokens + self.drop_path(self.ls1(_self_attention(self.mha_op, self.norm1(tokens))))
        x = tokens.transpose(1, 2).reshape(shape)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def _pooling_matrix(n, size, device, dtype):
    """``(size, n)``: row i averages entries floor(i n / size) .. ceil((i + 1) n / size) - 1, the
    cells of adaptive average pooling (they overlap, or repeat entries when n < size)."""
    i = torch.arange(size, device=device)
    start = torch.div(i * n, size, rounding_mode="floor")
    end = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    j = torch.arange(n, device=device)
    cells = (j >= start.unsqueeze(1)) & (j < end.unsqueeze(1))
    return cells.to(dtype) / (end - start).unsqueeze(1).to(dtype)


def _adaptive_avg_pool2d(x, size):
    """``F.adaptive_avg_pool2d(x, size)`` of an NCHW map to ``size x size``.

    Under torch.export it runs as two products with averaging matrices built from x's sizes, so
    those sizes stay symbolic through every lowering: torch.onnx lowers adaptive pooling to cells
    computed from the traced sizes, so the ONNX model would take only the traced image size.
    Same cells, same means; only the order of the sums differs (rounding)."""
    if not torch.compiler.is_exporting():
        return F.adaptive_avg_pool2d(x, size)
    acc = torch.promote_types(x.dtype, torch.float32)
    rows = _pooling_matrix(x.shape[-2], size, x.device, acc)
    cols = _pooling_matrix(x.shape[-1], size, x.device, acc)
    return (rows @ x.to(acc) @ cols.T).to(x.dtype)


class GLMixBlock(nn.Module):
    """The GLMix block: soft-clustered global attention plus a depthwise-conv local branch, then a
    conv MLP (docs/math.md#glmix-block).

    The global branch runs on ``glmix_kernels.soft_cluster`` / ``soft_dispatch`` with the block's
    ``backend`` (changeable at any time). ``slot_scale`` is the temperature: a learnable 0-d
    parameter initialised to ``embed_dim ** -0.5``, or a buffer with ``scale_mode="const"``.
    Setting ``use_global_branch = False`` leaves the local branch alone (for mixer comparisons;
    the global branch's parameters stay, so checkpoints still load).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_slots=64,
        slot_init="ada_avgpool",
        slot_scale=None,
        scale_mode="learnable",
        local_dw_ks=5,
        mlp_ratio=4.0,
        drop_path=0.0,
        norm_layer=LayerNorm2d,
        cpe_ks=0,
        mlp_dw=False,
        layerscale=-1,
        use_slot_attention=True,
        backend="auto",
    ):
        super().__init__()
        if scale_mode not in ("learnable", "const"):
            raise ValueError(f"scale_mode must be 'learnable' or 'const', got {scale_mode!r}")
        if slot_init not in ("param", "ada_avgpool"):
            raise ValueError(f"slot_init must be 'param' or 'ada_avgpool', got {slot_init!r}")
        self.embed_dim = embed_dim
        self.scale_mode = scale_mode
        self.slot_init = slot_init
        self.use_slot_attention = use_slot_attention
        self.backend = _check_backend(backend)
        self.use_global_branch = True

        scale = torch.tensor(embed_dim**-0.5 if slot_scale is None else float(slot_scale))
        if scale_mode == "learnable":
            self.slot_scale = nn.Parameter(scale)
        else:
            self.register_buffer("slot_scale", scale)

        self.with_conv_pos_emb = cpe_ks > 0
        if self.with_conv_pos_emb:
            self.pos_conv = _pos_conv(embed_dim, cpe_ks)

        if slot_init == "param":
            self.init_slots = nn.Parameter(torch.empty(1, num_slots, embed_dim))
            nn.init.normal_(self.init_slots, std=0.02)
        else:
            self.pool_size = math.isqrt(num_slots)
            if self.pool_size**2 != num_slots:
                raise ValueError(
                    f"slot_init='ada_avgpool' pools to a square grid: num_slots must be a "
                    f"perfect square, got {num_slots}"
                )

        self.norm1 = norm_layer(embed_dim)
        self.relation_mha = (
            nn.MultiheadAttention(embed_dim, num_heads, batch_first=True) if use_slot_attention else nn.Identity()
        )
        # conv1x1 -> depthwise -> conv1x1 mimics qkv projection, attention and output projection.
        self.feature_conv = (
            nn.Sequential(
                nn.Conv2d(embed_dim, embed_dim, 1),
                nn.Conv2d(embed_dim, embed_dim, local_dw_ks, padding=local_dw_ks // 2, groups=embed_dim),
                nn.Conv2d(embed_dim, embed_dim, 1),
            )
            if local_dw_ks > 0
            else nn.Identity()
        )

        self.norm2 = norm_layer(embed_dim)
        self.mlp = _conv_mlp(embed_dim, mlp_ratio, mlp_dw)
        self.drop_path = _drop_path(drop_path)
        self.ls1 = _layer_scale(embed_dim, layerscale, "nchw")
        self.ls2 = _layer_scale(embed_dim, layerscale, "nchw")

    def _mixer_inputs(self, x):
        """From the block input: the residual stream after the position conv, its ``norm1`` map,
        that map as ``(B, L, C)`` pixels (a view, no copy) and the initial slots."""
        if self.slot_init == "ada_avgpool":
            # Pooled from the block input, before the position conv (as the authors do).
            init_slots = _adaptive_avg_pool2d(x, self.pool_size).flatten(2).transpose(1, 2)
        else:
            init_slots = self.init_slots
        if self.with_conv_pos_emb:
            x = x + self.pos_conv(x)
        y = self.norm1(x)
        return x, y, y.flatten(2).transpose(1, 2), init_slots

    def forward(self, x):
        x, y, pixels, init_slots = self._mixer_inputs(x)
        mixed = self.feature_conv(y)
        if self.use_global_branch:
            slots = soft_cluster(pixels, init_slots, self.slot_scale, backend=self.backend)
            if self.use_slot_attention:
                slots = _self_attention(self.relation_mha, slots)
            dispatched = soft_dispatch(pixels, init_slots, self.slot_scale, slots, backend=self.backend)
            # (B, L, C) -> (B, C, H, W) as a strided view: the sum reads it in place.
            mixed = dispatched.transpose(1, 2).unflatten(2, y.shape[2:]) + mixed
        x = x + self.drop_path(self.ls1(mixed))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def slot_assignment(self, x):
        """Dispatch weights ``(B, S, H, W)`` (softmax over slots) for block input ``x`` ``(B, C, H, W)``.

        Computed on demand with the reference math, so the fused forward never keeps logits.
        """
        _, y, pixels, init_slots = self._mixer_inputs(x)
        return reference.slot_assignment(pixels, init_slots, self.slot_scale).unflatten(2, y.shape[2:])

    def extra_repr(self):
        return (
            f"scale_mode={self.scale_mode}, slot_init={self.slot_init}, "
            f"use_slot_attention={self.use_slot_attention}, backend={self.backend!r}"
        )


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks of one mixing mode, NCHW in and out.

    ``use_checkpoint`` recomputes the stage in backward (activation checkpointing); it changes
    neither the results nor the state dict.
    """

    def __init__(
        self,
        dim,
        num_heads,
        depth,
        mlp_ratio=4.0,
        drop_path=0.0,
        mixing_mode="glmix",
        local_dw_ks=5,
        slot_init="ada_avgpool",
        num_slots=64,
        use_slot_attention=True,
        cpe_ks=0,
        mlp_dw=False,
        layerscale=-1,
        use_checkpoint=False,
        backend="auto",
    ):
        super().__init__()
        if mixing_mode not in MIXING_MODES:
            raise ValueError(f"mixing_mode must be one of {MIXING_MODES}, got {mixing_mode!r}")
        self.dim = dim
        self.depth = depth
        self.mixing_mode = mixing_mode
        self.use_checkpoint = use_checkpoint
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth

        def glmix(p):
            return GLMixBlock(
                dim,
                num_heads,
                num_slots=num_slots,
                slot_init=slot_init,
                local_dw_ks=local_dw_ks,
                mlp_ratio=mlp_ratio,
                drop_path=p,
                cpe_ks=cpe_ks,
                mlp_dw=mlp_dw,
                layerscale=layerscale,
                use_slot_attention=use_slot_attention,
                backend=backend,
            )

        def mha_nchw(p):
            return MHSANCHWBlock(
                dim, num_heads, mlp_ratio=mlp_ratio, drop_path=p, cpe_ks=cpe_ks, mlp_dw=mlp_dw, layerscale=layerscale
            )

        def mha(p):
            return MHSABlock(dim, num_heads, mlp_ratio=mlp_ratio, drop_path=p, layerscale=layerscale)

        if mixing_mode == "glmix.mha_nchw":  # hybrid: GLMix at even positions, attention at odd
            blocks = [glmix(p) if i % 2 == 0 else mha_nchw(p) for i, p in enumerate(rates)]
        else:
            make = {"glmix": glmix, "mha_nchw": mha_nchw, "mha": mha}[mixing_mode]
            blocks = [make(p) for p in rates]
        self.blocks = nn.ModuleList(blocks)

    def _forward(self, x):
        if self.mixing_mode == "mha":  # these blocks work on (B, L, C) tokens
            shape = x.shape
            x = x.permute(0, 2, 3, 1).flatten(1, 2)
            for blk in self.blocks:
                x = blk(x)
            return x.transpose(1, 2).reshape(shape)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def extra_repr(self):
        return f"dim={self.dim}, depth={self.depth}, mixing_mode={self.mixing_mode!r}"


def _check_layout(transition_layout):
    if transition_layout not in ("norm.proj", "proj.norm"):
        raise ValueError(f"transition_layout must be 'norm.proj' or 'proj.norm', got {transition_layout!r}")


def _transition(dim_in, dim_out, layout, norm_layer, **conv):
    proj = nn.Conv2d(dim_in, dim_out, **conv)
    if layout == "norm.proj":
        return nn.Sequential(norm_layer(dim_in), proj)
    return nn.Sequential(proj, norm_layer(dim_out))


class NonOverlappedPatchEmbeddings(nn.ModuleList):
    """Swin-style downsampling: a 4x4/4 patchify stem, then 2x2/2 transitions."""

    def __init__(self, embed_dims, in_chans=3, midd_order="norm.proj", norm_layer=nn.BatchNorm2d):
        _check_layout(midd_order)
        stem = nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], kernel_size=4, stride=4), norm_layer(embed_dims[0]))
        super().__init__(
            [stem]
            + [
                _transition(embed_dims[i], embed_dims[i + 1], midd_order, norm_layer, kernel_size=2, stride=2)
                for i in range(3)
            ]
        )


class OverlappedPatchEmbeddings(nn.ModuleList):
    """Overlapping downsampling: a two-conv 3x3/2 stem, then 3x3/2 transitions."""

    def __init__(
        self, embed_dims, in_chans=3, dual_patch_norm=False, midd_order="proj.norm", norm_layer=nn.BatchNorm2d
    ):
        _check_layout(midd_order)
        half = embed_dims[0] // 2
        stem = nn.Sequential(
            # Index 0 is a placeholder without the input norm, so the convs keep their indices.
            LayerNorm2d(in_chans) if dual_patch_norm else nn.Identity(),
            nn.Conv2d(in_chans, half, kernel_size=3, stride=2, padding=1),
            norm_layer(half),
            nn.GELU(),
            nn.Conv2d(half, embed_dims[0], kernel_size=3, stride=2, padding=1),
            norm_layer(embed_dims[0]),
        )
        super().__init__(
            [stem]
            + [
                _transition(
                    embed_dims[i], embed_dims[i + 1], midd_order, norm_layer, kernel_size=3, stride=2, padding=1
                )
                for i in range(3)
            ]
        )


class GLNet(nn.Module):
    """The GLNet backbone and classifier, with the authors' constructor keywords.

    ``norm_layer`` is the norm of the downsampling layers and (unless ``pre_head_norm_layer``) of
    the final norm; the blocks' own norms are fixed (LayerNorm2d / LayerNorm), as in the authors'
    code. ``backend`` goes to every GLMix block; ``set_backend`` changes it later.
    ``qk_scale`` and ``drop_rate`` are accepted because the authors' signature has them, but their
    model never uses them, so only their no-op values are allowed.
    """

    def __init__(
        self,
        *,
        in_chans=3,
        num_classes=1000,
        depth=(2, 2, 6, 2),
        embed_dim=(96, 192, 384, 768),
        head_dim=32,
        qk_scale=None,
        drop_path_rate=0.0,
        drop_rate=0.0,
        use_checkpoint_stages=(),
        mlp_ratios=(4, 4, 4, 4),
        norm_layer=LayerNorm2d,
        pre_head_norm_layer=None,
        mixing_modes=("glmix", "glmix", "glmix", "mha"),
        local_dw_ks=5,
        slot_init="param",
        num_slots=64,
        cpe_ks=0,
        downsample_style="non_ovlp",
        transition_layout="proj.norm",
        dual_patch_norm=False,
        mlp_dw=False,
        layerscale=-1.0,
        backend="auto",
    ):
        super().__init__()
        if qk_scale is not None or drop_rate != 0:
            raise ValueError(
                "qk_scale and drop_rate have no effect in GLNet (nor in the authors' code); "
                f"leave them at None and 0, got {qk_scale!r} and {drop_rate!r}"
            )
        if downsample_style not in ("ovlp", "non_ovlp"):
            raise ValueError(f"downsample_style must be 'ovlp' or 'non_ovlp', got {downsample_style!r}")
        self.num_classes = num_classes
        self.embed_dim = list(embed_dim)
        self.num_features = embed_dim[-1]

        if downsample_style == "ovlp":
            self.downsample_layers = OverlappedPatchEmbeddings(
                embed_dim,
                in_chans=in_chans,
                dual_patch_norm=dual_patch_norm,
                midd_order=transition_layout,
                norm_layer=norm_layer,
            )
        else:
            self.downsample_layers = NonOverlappedPatchEmbeddings(
                embed_dim, in_chans=in_chans, midd_order=transition_layout, norm_layer=norm_layer
            )

        # On the CPU explicitly: the model may be built under a meta-device context.
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        if isinstance(local_dw_ks, int):
            local_dw_ks = [local_dw_ks] * 4
        self.stages = nn.ModuleList(
            BasicLayer(
                embed_dim[i],
                embed_dim[i] // head_dim,
                depth[i],
                mlp_ratio=mlp_ratios[i],
                drop_path=rates[sum(depth[:i]) : sum(depth[: i + 1])],
                mixing_mode=mixing_modes[i],
                local_dw_ks=local_dw_ks[i],
                slot_init=slot_init,
                num_slots=num_slots,
                cpe_ks=cpe_ks,
                mlp_dw=mlp_dw,
                layerscale=layerscale,
                use_checkpoint=i in use_checkpoint_stages,
                backend=backend,
            )
            for i in range(4)
        )

        self.norm = (pre_head_norm_layer or norm_layer)(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

        self.in_chans = in_chans
        self.downsample_style = downsample_style
        self.grad_checkpointing = False
        # timm's feature description: both stems reduce by 4, each transition by 2 more.
        self.feature_info = [dict(num_chs=embed_dim[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)]
        first_conv = "downsample_layers.0.1" if downsample_style == "ovlp" else "downsample_layers.0.0"
        self.pretrained_cfg = dict(_PRETRAINED_CFG, num_classes=num_classes, first_conv=first_conv)

    def set_backend(self, backend):
        """Runs every GLMix block's soft clustering and dispatch on ``backend``; returns the model."""
        _check_backend(backend)
        for m in self.modules():
            if isinstance(m, GLMixBlock):
                m.backend = backend
        return self

    @property
    def default_cfg(self):  # timm's older name for pretrained_cfg
        return self.pretrained_cfg

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """A new ``num_classes`` head (0: none); ``global_pool`` is timm's argument, only the mean
        over pixels (``"avg"``) exists here."""
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"global_pool must be 'avg' (GLNet averages over pixels), got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self):
        """Parameter names a timm optimizer factory keeps out of weight decay, beyond the 0-d and 1-d
        ones (``slot_scale``, norms, biases) it always skips. The authors' list names parameters
        GLNet does not have, so none: their training decayed everything else."""
        return set()

    def set_grad_checkpointing(self, enable=True):
        """Recompute every stage in backward (timm's switch for activation checkpointing)."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.use_checkpoint = enable

    def check_input(self, x):
        """Raises ValueError unless ``x`` is an ``(N, in_chans, H, W)`` batch the stem can take."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an (N, {self.in_chans}, H, W) image batch, got {shape}")
        # The 4x4/4 patchify stem and the 2x2/2 transitions drop the border; the last needs 2 cells.
        # The overlapped stem pads, so any size gives maps of ceil(H / stride).
        smallest = 32 if self.downsample_style == "non_ovlp" else 1
        h, w = x.shape[2:]
        if min(h, w) < smallest:
            raise ValueError(
                f"x is {h}x{w}: the {self.downsample_style} stem needs images of at least "
                f"{smallest}x{smallest} (stride 32 to the last stage)"
            )

    def forward_intermediates(
        self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False
    ):
        """timm's multi-scale interface: the outputs of the stages picked by ``indices`` (None: all;
        an int n: the last n; a sequence: those, negatives from the end), NCHW at strides 4, 8,
        16, 32. ``norm`` passes the last stage's map through the final norm when it is picked.
        Returns the list, or ``(final features, list)`` unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        take = _take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        intermediates = []
        n_stages = max(take) + 1 if (stop_early or intermediates_only) else len(self.stages)
        for i in range(n_stages):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if n_stages == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drops the stages after the last of ``indices`` (and the final norm / the head when asked);
        returns the indices, normalised, as ``forward_intermediates`` takes them."""
        take = _take_indices(len(self.stages), indices)
        keep = max(take) + 1
        self.stages = self.stages[:keep]
        self.downsample_layers = nn.ModuleList(list(self.downsample_layers)[:keep])
        self.feature_info = self.feature_info[:keep]
        if prune_norm or keep < 4:  # the final norm has the last stage's width
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x):
        self.check_input(x)
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))

    @torch.no_grad()
    def slot_assignment_maps(self, images, stage, block):
        """Slot-assignment maps ``(B, S, H, W)`` (softmax over slots) of GLMix block ``block`` of
        stage ``stage``, for visualisation.

        Runs the network up to that block and computes the maps from its input, in the model's
        current mode (call ``eval()`` first for inference statistics).
        """
        stage = range(len(self.stages))[stage]  # normalises negative indices, raises IndexError
        blocks = self.stages[stage].blocks
        block = range(len(blocks))[block]
        if not isinstance(blocks[block], GLMixBlock):
            glmix = [
                (i, j) for i, s in enumerate(self.stages) for j, b in enumerate(s.blocks) if isinstance(b, GLMixBlock)
            ]
            raise ValueError(
                f"stage {stage} block {block} is a {type(blocks[block]).__name__}, not a "
                f"GLMixBlock; GLMix blocks (stage, block): {glmix}"
            )
        x = images
        for i in range(stage):
            x = self.stages[i](self.downsample_layers[i](x))
        x = self.downsample_layers[stage](x)
        for blk in blocks[:block]:
            x = blk(x)
        return blocks[block].slot_assignment(x)


def _take_indices(n, indices):
    """timm's index rule: None: all n; an int k: the last k; a sequence: those (negatives from the end)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices must pick 1 to {n} stages, got {indices}")
        return list(range(n - indices, n))
    take = [range(n)[i] for i in indices]  # IndexError names an index out of range
    if not take:
        raise ValueError("indices must pick at least one stage, got an empty sequence")
    return take


def _init_weights(m):
    if isinstance(m, nn.Linear):  # includes the attention output projections
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class GLNetTokenLabeling(GLNet):
    """GLNet trained with token labeling (the authors' ``GLNet_tklb``): an extra per-token head.

    Training mode mixes a random box of the stem output with the flipped batch (CutMix inside the
    batch, aligned with the stride-32 grid) and returns ``(logits, token_logits, box)`` with the
    token logits un-mixed, ``box = (r1, c1, r2, c2)`` in final-stage cells. Eval mode returns
    ``logits + 0.5 * max over tokens of token_logits``.
    """

    def __init__(self, **glnet_kwargs):
        super().__init__(**glnet_kwargs)
        self.tklb_beta = 1.0
        self.tklb_pooling_scale = 8  # stem stride 4 to final stride 32
        # Created after the base class's weight init, so it keeps PyTorch's default init as theirs does.
        self.tklb_aux_head = nn.Linear(self.num_features, self.num_classes)

    def reset_classifier(self, num_classes):
        super().reset_classifier(num_classes)
        self.tklb_aux_head = nn.Linear(self.num_features, num_classes)

    def _cutmix_box(self, rows, cols):
        """A random box ``(r1, c1, r2, c2)`` on a ``rows x cols`` grid, side ``sqrt(1 - lam)`` of
        the grid's, lam ~ Beta(beta, beta), centred uniformly and clipped (token labeling's rule)."""
        lam = torch.distributions.Beta(self.tklb_beta, self.tklb_beta).sample().item()
        cut = math.sqrt(1.0 - lam)
        h, w = int(rows * cut), int(cols * cut)
        r, c = torch.randint(rows, ()).item(), torch.randint(cols, ()).item()
        return (
            min(max(r - h // 2, 0), rows),
            min(max(c - w // 2, 0), cols),
            min(max(r + h // 2, 0), rows),
            min(max(c + w // 2, 0), cols),
        )

    def forward(self, x):
        self.check_input(x)
        x = self.downsample_layers[0](x)
        s = self.tklb_pooling_scale
        if self.training:
            rows, cols = x.shape[2] // s, x.shape[3] // s
            r1, c1, r2, c2 = self._cutmix_box(rows, cols)
            mixed = x.clone()
            mixed[:, :, s * r1 : s * r2, s * c1 : s * c2] = x.flip(0)[:, :, s * r1 : s * r2, s * c1 : s * c2]
            x = mixed
        x = self.stages[0](x)
        for i in range(1, 4):  # indexed: slicing the downsampling ModuleList would rerun its __init__
            x = self.stages[i](self.downsample_layers[i](x))
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        logits = self.head(tokens.mean(1))
        token_logits = self.tklb_aux_head(tokens)  # (B, L, classes)
        if not self.training:
            return logits + 0.5 * token_logits.max(1)[0]
        # Undo the mix on the token grid, so each token's target is its source image's label.
        grid = token_logits.reshape(x.shape[0], rows, cols, -1)
        unmixed = grid.clone()
        unmixed[:, r1:r2, c1:c2] = grid.flip(0)[:, r1:r2, c1:c2]
        return logits, unmixed.reshape(x.shape[0], rows * cols, -1), (r1, c1, r2, c2)
