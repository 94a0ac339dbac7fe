import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from core.errors import UserError
from core.vision_transformer import ARCHS, DropPath, VisionTransformer, build_vit, vit_small, vit_tiny

BLOCK_KEYS = [
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]
# Keys (in order) of the official DINO ViT-S/16 backbone (torch.hub dino_vits16).
DINO_VITS16_KEYS = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
                    + [f"blocks.{i}.{k}" for i in range(12) for k in BLOCK_KEYS]
                    + ["norm.weight", "norm.bias"])


def tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    return VisionTransformer(**{**args, **kw})


@pytest.fixture(scope="module")
def small16():
    torch.manual_seed(0)
    return vit_small(16).eval()


def test_official_dino_keys_and_shapes(small16):
    sd = small16.state_dict()
    assert list(sd) == DINO_VITS16_KEYS
    assert sd["cls_token"].shape == (1, 1, 384)
    assert sd["pos_embed"].shape == (1, 197, 384)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert sd["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert small16.embed_dim == small16.num_features == 384 and small16.patch_size == 16
    assert small16.num_register_tokens == 0


def test_arch_sizes_match_timm():
    """Same key names and shapes as timm's ViTs for every size; parameter counts are the published ones."""
    counts = {"vit_tiny": 5_524_416, "vit_small": 21_665_664, "vit_base": 85_798_656, "vit_large": 303_301_632}
    with torch.device("meta"):
        for arch in ARCHS:
            ours = build_vit(arch, 16)
            ref = timm.create_model(f"{arch}_patch16_224", pretrained=False, num_classes=0)
            assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
            assert sum(p.numel() for p in ours.parameters()) == counts[arch]
    assert ARCHS == ("vit_tiny", "vit_small", "vit_base", "vit_large")


def test_timm_vit_small_loads_strict_and_matches(small16):
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    small16.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = small16(x)
        assert out.shape == (1, 384)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=0)


def timm_to_dinov2(sd):
    """timm stores DINOv2-with-registers without a class position (no_embed_class); DINOv2 keeps a pos slot for
    [CLS]. A zero slot makes the layouts compute the same function."""
    sd = dict(sd)
    sd["register_tokens"] = sd.pop("reg_token")
    pos = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    sd["mask_token"] = torch.zeros(1, pos.shape[-1])
    return sd


def randomize_layerscale(model):
    """Default gammas of 1e-5 would make every block nearly the identity and the comparison vacuous."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(0, 1)


DEPTH = 3  # DINOv2 ViT-S/14 layout, fewer blocks to stay fast


def dinov2_small(**kw):
    return VisionTransformer(img_size=56, patch_size=14, embed_dim=384, depth=DEPTH, num_heads=6, init_values=1e-5,
                             mask_token=True, **kw)


def test_dinov2_registers_layout_matches_timm():
    torch.manual_seed(2)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                            depth=DEPTH).eval()
    randomize_layerscale(ref)
    ours = dinov2_small(num_register_tokens=4).eval()
    sd = timm_to_dinov2(ref.state_dict())
    assert set(ours.state_dict()) == set(sd)
    assert "blocks.0.ls1.gamma" in sd and f"blocks.{DEPTH - 1}.ls2.gamma" in sd
    assert ours.state_dict()["register_tokens"].shape == (1, 4, 384)
    assert ours.state_dict()["mask_token"].shape == (1, 384)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = ours.forward_features(x)
        assert tokens.shape == (2, 1 + 4 + 16, 384)
        torch.testing.assert_close(tokens, ref.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        attn = ours.get_last_selfattention(x)
    assert attn.shape == (2, 6, 21, 21)


def test_dinov2_without_registers_matches_timm():
    torch.manual_seed(3)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                            depth=DEPTH).eval()
    randomize_layerscale(ref)
    ours = dinov2_small().eval()
    sd = {**ref.state_dict(), "mask_token": torch.zeros(1, 384)}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_sdpa_matches_explicit_attention():
    torch.manual_seed(4)
    model = tiny(num_register_tokens=2).eval()
    x = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        fused = model.forward_features(x)
        model.fused_attn = False
        assert not any(b.attn.fused_attn for b in model.blocks)
        explicit = model.forward_features(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


def test_last_selfattention_equals_manual():
    torch.manual_seed(5)
    model = tiny(num_register_tokens=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        h = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            h = blk(h)
        blk = model.blocks[-1]
        y = blk.norm1(h)
        qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        C, heads = 48, 3
        d = C // heads
        q, k = qkv[..., :C], qkv[..., C:2 * C]
        manual = torch.stack([
            torch.softmax(q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / math.sqrt(d), -1)
            for i in range(heads)], dim=1)
    T = 1 + 1 + 16
    assert attn.shape == (2, heads, T, T)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, T))
    torch.testing.assert_close(attn, manual, atol=1e-6, rtol=0)


def keys_bicubic_matrix(n_in, n_out, scale, a=-0.75):
    """1-D bicubic resampling matrix (Keys kernel, half-pixel centres, border replicated) for a given scale."""
    def kernel(s):
        s = abs(s)
        if s <= 1:
            return (a + 2) * s ** 3 - (a + 3) * s ** 2 + 1
        if s < 2:
            return a * s ** 3 - 5 * a * s ** 2 + 8 * a * s - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[o, min(max(j, 0), n_in - 1)] += kernel(src - j)
    return m


def test_interpolation_non_square_matches_reference():
    torch.manual_seed(6)
    model = tiny(img_size=(32, 48))  # native grid 4 x 6 (h x w)
    H, W = 56, 24  # new grid 7 x 3: taller than wide, so a height/width swap cannot go unnoticed
    tokens = torch.zeros(1, 1 + 21, 48)
    pos = model.interpolate_pos_encoding(tokens, W, H).detach()
    assert pos.shape == (1, 22, 48)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0].detach(), atol=0, rtol=0)

    grid = model.pos_embed[0, 1:].detach().double().numpy().reshape(4, 6, 48)
    mh = keys_bicubic_matrix(4, 7, (7 + 0.1) / 4)
    mw = keys_bicubic_matrix(6, 3, (3 + 0.1) / 6)
    expected = np.einsum("hi,ijc,wj->hwc", mh, grid, mw).reshape(1, 21, 48)
    np.testing.assert_allclose(pos[:, 1:].numpy(), expected, atol=1e-6)

    by_size = F.interpolate(model.pos_embed[:, 1:].detach().reshape(1, 4, 6, 48).permute(0, 3, 1, 2),
                            size=(7, 3), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 21, 48)
    assert (pos[:, 1:] - by_size).abs().max() < 0.5 * model.pos_embed.detach().abs().max()


def test_interpolation_close_to_explicit_size_for_smooth_embedding():
    model = tiny(img_size=64)  # 8 x 8 grid
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    freqs = torch.linspace(0.1, 0.4, 48)
    smooth = torch.sin(rows[..., None] * freqs) + torch.cos(cols[..., None] * freqs)
    with torch.no_grad():
        model.pos_embed[0, 1:] = smooth.reshape(64, 48)
    pos = model.interpolate_pos_encoding(torch.zeros(1, 1 + 60, 48), 80, 96).detach()  # grid 12 x 10
    ref = F.interpolate(smooth.permute(2, 0, 1)[None], size=(12, 10), mode="bicubic")
    torch.testing.assert_close(pos[0, 1:], ref[0].permute(1, 2, 0).reshape(120, 48), atol=0.05, rtol=0)


def test_interpolation_keeps_row_only_variation():
    model = tiny(img_size=32)  # 4 x 4 grid
    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.arange(4.0).repeat_interleave(4)[:, None].expand(16, 48) ** 2
    pos = model.interpolate_pos_encoding(torch.zeros(1, 1 + 10, 48), 40, 16).detach()  # grid 2 x 5
    grid = pos[0, 1:].reshape(2, 5, 48)
    torch.testing.assert_close(grid, grid[:, :1].expand(2, 5, 48), atol=1e-5, rtol=0)
    assert grid[1, 0, 0] - grid[0, 0, 0] > 1.0


def test_interpolation_identity_at_native_grid_and_forward_any_size():
    model = tiny(img_size=(32, 48)).eval()
    assert model.interpolate_pos_encoding(torch.zeros(1, 25, 48), 48, 32) is model.pos_embed
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 16)).shape == (2, 48)
        assert model.forward_features(torch.randn(2, 3, 40, 16)).shape == (2, 1 + 10, 48)


def test_intermediate_layers():
    torch.manual_seed(7)
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n=2)
        assert len(layers) == 2
        torch.testing.assert_close(layers[-1], model.forward_features(x), atol=0, rtol=0)
        h = model.prepare_tokens(x)
        for blk in model.blocks[:2]:
            h = blk(h)
        torch.testing.assert_close(layers[0], model.norm(h), atol=0, rtol=0)
        # forward computes the [CLS] token alone in the last block: equal up to summation order
        torch.testing.assert_close(model(x), layers[-1][:, 0], atol=1e-6, rtol=1e-5)


def test_stochastic_depth_schedule_and_modes():
    torch.manual_seed(8)
    model = tiny(depth=4, drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3], atol=1e-7)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
        model.train()
        assert (model(x) - model(x)).abs().max() > 1e-3
        plain = tiny(depth=4).train()
        torch.testing.assert_close(plain(x), plain(x), atol=0, rtol=0)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(9)
    out = DropPath(0.25).train()(torch.ones(4000, 3, 5))
    per_sample = out.reshape(4000, -1)
    kept = per_sample[per_sample != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03


def original_forward(model, x, draws):
    """The original ViT's training forward, written out: every token through every block, then [CLS]; drop path
    multiplies each branch by a per-sample mask drawn as DropPath draws it (recorded in `draws`)."""
    h = model.prepare_tokens(x)
    for blk in model.blocks:
        for norm, branch, scale in ((blk.norm1, blk.attn, blk.ls1), (blk.norm2, blk.mlp, blk.ls2)):
            keep = 1.0 - blk.drop_path.drop_prob
            mask = h.new_empty(len(h)).bernoulli_(keep) if keep < 1 else h.new_ones(len(h))
            draws.append(mask)
            h = h + scale(branch(norm(h))) * mask[:, None, None] / keep
    return model.head(model.norm(h)[:, 0])


def grads(model, x):
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("fused", [True, False])
def test_cls_only_last_block_and_skipped_drop_path_match_the_original(fused):
    """Our training forward (the last block computes [CLS] alone; on CPU a dropped sample's branch is not run)
    against the written-out original on the same draws: same output and gradients, with some samples dropped."""
    model = tiny(depth=4, drop_path_rate=0.6, num_register_tokens=2, init_values=0.5, num_classes=5).train()
    model.fused_attn = fused
    for seed in range(3):
        x = torch.randn(6, 3, 32, 32, requires_grad=True)
        torch.manual_seed(seed)
        out = model(x)
        out.square().sum().backward()
        ours = grads(model, x)
        model.zero_grad()
        x.grad = None
        draws = []
        torch.manual_seed(seed)
        ref = original_forward(model, x, draws)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for a, b in zip(ours, grads(model, x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        model.zero_grad()
        kept = torch.stack(draws[2:]).sum(1)  # the first block's rate is 0
        assert ((kept > 0) & (kept < 6)).any(), "the case of interest: some samples dropped, some kept"


def test_branch_dropped_for_every_sample_still_gets_zero_gradients():
    """With no sample keeping a branch, its parameters get zero gradients rather than none, as with the mask:
    AdamW still decays and steps them, and DDP sees them used."""
    torch.manual_seed(0)
    model = tiny(depth=2).train()
    model.blocks[-1].drop_path.drop_prob = 0.999  # this seed drops both branches for all 3 samples
    model(torch.randn(3, 3, 32, 32)).sum().backward()
    last = model.blocks[-1]
    for p in [*last.attn.parameters(), *last.mlp.parameters()]:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(model.patch_embed.proj.weight.grad) > 0


def test_avg_pool_layout_and_forward():
    torch.manual_seed(10)
    model = tiny(num_classes=10, global_pool="avg", num_register_tokens=2).eval()
    keys = set(model.state_dict())
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= keys
    assert "norm.weight" not in keys and "norm.bias" not in keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = tokens[:, 3:].mean(1)
        expected = F.layer_norm(pooled, (48,), model.fc_norm.weight, model.fc_norm.bias, 1e-6)
        expected = expected @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert tiny(num_classes=5).head.out_features == 5


def test_init():
    torch.manual_seed(11)
    model = tiny(embed_dim=192, num_heads=3, init_values=0.1)
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0
    assert torch.equal(model.norm.weight, torch.ones(192)) and model.norm.bias.abs().max() == 0
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((192,), 0.1))
    assert model.blocks[0].norm1.eps == 1e-6


def test_build_vit_builtin_and_errors():
    model = build_vit("vit_tiny", 4, img_size=32)
    assert model.patch_size == 4 and model.embed_dim == 192 and len(model.blocks) == 12
    assert model.blocks[0].attn.num_heads == 3 and model.pos_embed.shape == (1, 65, 192)
    with pytest.raises(UserError, match="vit_tiny, vit_small, vit_base, vit_large or timm/<name>"):
        build_vit("vit_huge")
    with pytest.raises(UserError, match="not_a_model"):
        build_vit("timm/not_a_model")
    with pytest.raises(UserError, match="global_pool"):
        vit_tiny(global_pool="max")
    with pytest.raises(UserError, match="foo"):
        build_vit("timm/resnet18", foo=1)


def test_timm_cnn_backbone():
    torch.manual_seed(12)
    model = build_vit("timm/resnet18", drop_path_rate=0.1, img_size=224).eval()
    assert model.embed_dim == 512
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        expected = model.model.forward_features(x).mean((2, 3))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_timm_vit_backbone_multicrop_sizes():
    torch.manual_seed(13)
    model = build_vit("timm/vit_tiny_patch16_224", drop_path_rate=0.2).eval()
    assert model.embed_dim == 192 and model.patch_size == 16
    assert abs(model.model.blocks[-1].drop_path1.drop_prob - 0.2) < 1e-6
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.model.forward_features(x)[:, 0], atol=1e-6, rtol=0)
    assert out.shape == (2, 192)
