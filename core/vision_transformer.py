"""Vision Transformer with the state-dict layout of the official DINO backbone (and DINOv2/MAE options).

Parameter names match facebookresearch/dino (and timm's ViTs), so official backbone weights load with strict=True;
LayerScale (ls1/ls2.gamma), register_tokens and mask_token follow DINOv2's names.
"""
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
SIZES = {  # arch -> (embed_dim, depth, num_heads)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling kept ones to keep the expectation."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def residual(self, x, branch, n_tokens=None):
        """x[:, :n_tokens] + self(branch(x)), where branch gives the first n_tokens tokens (all when None).

        On a CPU the branch runs only on the samples that keep it (the same per-sample draws, values and gradients,
        about drop_prob less work); elsewhere the mask multiplies, which needs no host sync and keeps shapes static.
        """
        base = x if n_tokens is None else x[:, :n_tokens]
        if self.drop_prob == 0.0 or not self.training:
            return base + branch(x)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return base + self(branch(x))
        keep = 1.0 - self.drop_prob
        kept = x.new_empty(x.shape[0]).bernoulli_(keep).nonzero().squeeze(1)
        if len(kept) == len(x):
            return torch.add(base, branch(x), alpha=1 / keep)
        # also with no sample kept: the branch then runs on an empty batch, so its parameters get zero gradients
        # (AdamW still steps them, DDP still sees them), as with the mask
        return base.index_add(0, kept, branch(x[kept]), alpha=1 / keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided conv; tokens come out row-major (height, then width)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        h, w = pair(img_size)
        self.patch_size = patch_size
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention. fused_attn=True uses SDPA; False (or return_attention) the explicit softmax path,
    which also serves as the naive benchmark baseline."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attention=False, n_queries=None):
        """n_queries: only the first n_queries tokens attend (and come out); all tokens are still keys and values."""
        if n_queries is not None and not return_attention and not (self.training and self.attn_drop.p > 0):
            return self.forward_queries(x, n_queries)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q = q[:, :, :n_queries]
        attn = None
        if self.fused_attn and not return_attention:
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C)))
        return (x, attn) if return_attention else x

    def forward_queries(self, x, n):
        """The first n tokens' outputs at O(tokens x dim) cost instead of O(tokens x dim^2), with no key or value
        projected: a score q.(Wk x + bk) is (Wk^T q).x plus q.bk, the same for every key, which the softmax cancels;
        and sum_j p_j (Wv x_j + bv) = Wv (sum_j p_j x_j) + bv. Every head attends over the same tokens x, so the
        heads' queries go in as rows of one attention (exact without attention dropout, which is 0 in the recipes)."""
        B, N, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :n], w[:C], None if b is None else b[:C]).reshape(B, n, heads, d).transpose(1, 2)
        q = (q @ w[C:2 * C].view(heads, d, C)).reshape(B, 1, heads * n, C)
        tokens = x.unsqueeze(1)
        if self.fused_attn:
            mixed = F.scaled_dot_product_attention(q, tokens, tokens, scale=self.scale)
        else:
            mixed = (q @ tokens.transpose(-2, -1) * self.scale).softmax(dim=-1) @ tokens
        out = mixed.view(B, heads, n, C) @ w[2 * C:].view(heads, d, C).transpose(1, 2)
        if b is not None:
            out = out + b[2 * C:].view(heads, 1, d)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, n, C)))


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT/DINOv2); the parameter is named gamma as in DINOv2 checkpoints."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 init_values=None, fused_attn=True):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, fused_attn)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x, return_attention=False, n_queries=None):
        """n_queries: compute only the first n_queries output tokens (the [CLS] token alone when 1)."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        x = self.drop_path.residual(x, lambda t: self.ls1(self.attn(self.norm1(t), n_queries=n_queries)), n_queries)
        return self.drop_path.residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 init_values=None, num_register_tokens=0, mask_token=False, global_pool="token", fused_attn=True):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise UserError(f'unknown global_pool "{global_pool}": choose token or avg')
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values, fused_attn)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim) if global_pool == "token" else nn.Identity()
        if global_pool == "avg":
            self.fc_norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def fused_attn(self):
        return self.blocks[0].attn.fused_attn

    @fused_attn.setter
    def fused_attn(self, value):
        """Switch every attention layer, including those a subclass adds (the MAE decoder)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = value

    def no_weight_decay(self):
        """Token and position parameters excluded from weight decay by MAE fine-tuning's param groups."""
        return {"pos_embed", "cls_token", "register_tokens", "mask_token"}

    def interpolate_pos_encoding(self, x, w, h):
        """Resize the patch position grid to an image of width w and height h (pixels), as DINO does: bicubic with
        scale factors (n + 0.1) / stored_n, the 0.1 avoiding floating-point rounding to one patch too few."""
        gh, gw = self.patch_embed.grid_size
        h0, w0 = h // self.patch_size, w // self.patch_size
        if (h0, w0) == (gh, gw):
            return self.pos_embed
        dim = x.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / gh, (w0 + 0.1) / gw), mode="bicubic")
        assert grid.shape[-2:] == (h0, w0)
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.interpolate_pos_encoding(x, w, h))
        if self.num_register_tokens:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x, cls_only=False):
        """All output tokens, normalised; cls_only: the [CLS] token alone, (B, 1, dim), for which the last block
        computes that one token (the same values, about a twelfth less work for a 12-block model)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.norm(self.blocks[-1](x, n_queries=1 if cls_only else None))

    def forward(self, x):
        if self.global_pool == "avg":
            x = self.forward_features(x)
            return self.head(self.fc_norm(x[:, 1 + self.num_register_tokens:].mean(dim=1)))
        return self.head(self.forward_features(x, cls_only=True)[:, 0])

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def _vit(arch, patch_size=16, **kwargs):
    embed_dim, depth, num_heads = SIZES[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return _vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return _vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return _vit("vit_base", patch_size, **kwargs)


def vit_large(patch_size=16, **kwargs):
    return _vit("vit_large", patch_size, **kwargs)


class TimmBackbone(nn.Module):
    """A timm model created with num_classes=0, so forward returns its pooled embedding."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.embed_dim = self.num_features = model.num_features
        patch_embed = getattr(model, "patch_embed", None)
        self.patch_size = pair(patch_embed.patch_size)[0] if patch_embed is not None else None
        self.num_register_tokens = getattr(model, "num_reg_tokens", 0)

    def forward(self, x):
        return self.model(x)


TIMM_OPTIONAL = ("dynamic_img_size", "img_size", "drop_path_rate", "drop_rate", "attn_drop_rate")


def _build_timm(name, **kwargs):
    """Create a timm model from scratch, dropping the size/regularisation kwargs its constructor does not take
    (e.g. a ResNet has no img_size); any other rejected kwarg is a user error."""
    import timm

    if not timm.is_model(name):
        raise UserError(f'unknown timm model "{name}": pick a name from timm.list_models()')
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    while True:
        try:
            return TimmBackbone(timm.create_model(name, pretrained=False, **kwargs))
        except TypeError as e:
            bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if bad is None or bad.group(1) not in kwargs:
                raise
            if bad.group(1) not in TIMM_OPTIONAL:
                raise UserError(f'timm model "{name}" does not accept {bad.group(1)}: remove that option') from e
            kwargs.pop(bad.group(1))


def build_vit(arch, patch_size=16, **kwargs):
    """Backbone by name: one of ARCHS (patch_size any int) or 'timm/<name>' (patch size fixed by the name)."""
    if arch in ARCHS:
        return _vit(arch, patch_size, **kwargs)
    if arch.startswith("timm/"):
        return _build_timm(arch[len("timm/"):], **kwargs)
    raise UserError(f'unknown arch "{arch}": choose {", ".join(ARCHS[:-1])}, {ARCHS[-1]} or timm/<name>')


def sincos_pos_embed_2d(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sine-cosine position embedding of facebookresearch/mae (util/pos_embed.py), as a (tokens, dim) tensor.

    The first half of the channels encodes the column, the second the row (MAE's meshgrid puts w first), each as
    [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(k / (dim / 4)); a class token gets zeros.
    """
    if embed_dim % 4:
        raise UserError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sine-cosine position embeddings")
    gh, gw = pair(grid_size)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def embed_1d(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat((out.sin(), out.cos()), dim=1)

    emb = torch.cat((embed_1d(cols), embed_1d(rows)), dim=1)
    if cls_token:
        emb = torch.cat((torch.zeros(1, embed_dim, dtype=torch.float64), emb))
    return emb.float()


def resample_pos_embed(pos_embed, grid_size, num_prefix_tokens=1):
    """A checkpoint's (1, prefix + n*n, dim) position embedding resized to another patch grid, as MAE's
    interpolate_pos_embed does on load (bicubic to the exact size); prefix tokens ([CLS], registers) are kept."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    gh, gw = pair(grid_size)
    n = int(round(grid.shape[1] ** 0.5))
    if n * n != grid.shape[1]:
        raise UserError(f"position embedding of {grid.shape[1]} patches is not a square grid: cannot resize it")
    if (n, n) == (gh, gw):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, n, n, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


def arch_sizes(arch, embed_dim=None, depth=None, num_heads=None):
    """(embed_dim, depth, num_heads) of one of ARCHS, each overridable, e.g. for a small model on a CPU."""
    if arch not in ARCHS:
        raise UserError(f'unknown arch "{arch}": choose {", ".join(ARCHS[:-1])} or {ARCHS[-1]}')
    sizes = tuple(d if v is None else v for v, d in zip((embed_dim, depth, num_heads), SIZES[arch]))
    if sizes[0] % sizes[2]:
        raise UserError(f"embed_dim {sizes[0]} is not divisible by num_heads {sizes[2]}: change one of them")
    return sizes


def check_image_size(img_size, patch_size):
    if img_size % patch_size:
        raise UserError(f"image size {img_size} is not divisible by the patch size {patch_size}: "
                        f"change --input_size or --patch_size")
