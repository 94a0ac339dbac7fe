"""Attention maps: DINO's mass threshold against a brute-force selection, the [CLS] attention against the block's
weights by hand, and the pictures of visualize_attention.py for a non-square image."""
import numpy as np
import pytest
import torch
from PIL import Image

import visualize_attention
from core.attention_maps import cls_attention, fit_in_box, head_colors, prepare, threshold_masks
from core.errors import UserError
from core.vision_transformer import build_vit


def brute_force_mask(weights, fraction):
    """Largest weights first, added until their share of the total reaches the fraction (float64, one at a time)."""
    weights = [float(w) for w in weights]
    total, mass, keep = sum(weights), 0.0, set()
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        if mass >= fraction:
            break
        keep.add(i)
        mass += weights[i] / total
    return [i in keep for i in range(len(weights))]


def test_threshold_hand_computed():
    """[0.5, 0.3, 0.15, 0.05]: 0.6 of the mass needs the two largest (0.8), 0.9 the three largest (0.95)."""
    attention = torch.tensor([[[0.15, 0.5], [0.05, 0.3]]])
    assert threshold_masks(attention, 0.6).tolist() == [[[False, True], [False, True]]]
    assert threshold_masks(attention, 0.9).tolist() == [[[True, True], [False, True]]]
    assert threshold_masks(attention * 7, 0.9).tolist() == [[[True, True], [False, True]]]  # unnormalised input


@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.95])
def test_threshold_matches_brute_force(fraction):
    attention = torch.rand(4, 5, 9, generator=torch.Generator().manual_seed(1)).pow(3)
    masks = threshold_masks(attention, fraction)
    assert masks.shape == attention.shape and masks.dtype == torch.bool
    for head, mask in zip(attention, masks):
        assert mask.flatten().tolist() == brute_force_mask(head.flatten(), fraction)
        share = head[mask].sum() / head.sum()
        assert share >= fraction and share - head[mask].min() / head.sum() < fraction


class FakeViT:
    """Attention of [CLS] to token t is t + 100 * head; one register token sits between [CLS] and the patches."""
    patch_size, num_register_tokens = 8, 1

    def get_last_selfattention(self, images):
        n = 2 + (images.shape[-2] // 8) * (images.shape[-1] // 8)
        attn = torch.zeros(1, 2, n, n)
        attn[0, :, 0] = torch.arange(n) + 100 * torch.arange(2)[:, None]
        return attn


def test_cls_attention_grid_is_row_major_without_registers():
    maps = cls_attention(FakeViT(), torch.zeros(1, 3, 40, 72), torch.device("cpu"))
    assert maps.shape == (2, 5, 9)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(9), indexing="ij")
    for head in range(2):
        assert torch.equal(maps[head], (2 + rows * 9 + cols + 100 * head).float())


def test_cls_attention_matches_block_weights():
    """Softmax(q k^T / sqrt(d)) of the last block, computed from its qkv weights, on a non-square image."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", 8, img_size=32, num_register_tokens=2).eval()
    images = torch.randn(1, 3, 40, 72)
    maps = cls_attention(model, images, torch.device("cpu"))
    with torch.no_grad():
        x = model.prepare_tokens(images)
        for block in model.blocks[:-1]:
            x = block(x)
        last = model.blocks[-1]
        q, k, _ = last.attn.qkv(last.norm1(x))[0].chunk(3, dim=-1)
        heads, dim = last.attn.num_heads, q.shape[-1] // last.attn.num_heads
        for h in range(heads):
            qh, kh = q[:, h * dim:(h + 1) * dim], k[:, h * dim:(h + 1) * dim]
            weights = torch.softmax(qh[0] @ kh.T / dim ** 0.5, dim=0)
            torch.testing.assert_close(maps[h], weights[3:].reshape(5, 9), atol=1e-6, rtol=1e-5)


def test_resize_keeps_aspect_then_crops_to_patches():
    assert fit_in_box(640, 480, 480, 480) == (480, 360)
    assert fit_in_box(75, 43, 43, 75) == (75, 43)
    assert fit_in_box(40, 100, 480, 480) == (192, 480)
    rgb = np.zeros((43, 75, 3), np.uint8)
    assert prepare(rgb, 8, (86, 150))[0].shape == (80, 144, 3)  # box: scaled x2 to 150x86, cropped to 144x80
    picture, images = prepare(rgb, 8, 48)  # short side 48: 83x48, cropped to 80x48
    assert picture.shape == (48, 80, 3) and images.shape == (1, 3, 48, 80)
    with pytest.raises(UserError, match="smaller than one"):
        prepare(rgb[:7], 8)


def args_for(tmp_path, *extra):
    return visualize_attention.get_args_parser().parse_args(
        ["--arch", "vit_tiny", "--output_dir", str(tmp_path / "out"), "--device", "cpu", *extra])


def test_visualize_attention_non_square(tmp_path):
    """75x43 image in a 43x75 box: cropped to 72x40 (9x5 patches of 8), one PNG per head at that size, masks tinting
    exactly the pixels of the thresholded patches."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(20, 231, (43, 75, 3), dtype=np.uint8)  # never a pure mask colour: every tinted pixel changes
    Image.fromarray(rgb).save(tmp_path / "img.png")
    torch.manual_seed(0)
    written = visualize_attention.main(args_for(tmp_path, "--image_path", str(tmp_path / "img.png"),
                                                "--image_size", "43", "75", "--threshold", "0.6"))
    out = tmp_path / "out"
    heads = 3  # vit_tiny
    expected = {"img.png", "attn-heads.png"} | {f"attn-head{j}.png" for j in range(heads)} \
        | {f"mask_th0.6_head{j}.png" for j in range(heads)}
    assert {p.name for p in out.iterdir()} == expected and len(written) == len(expected)
    for name in expected - {"attn-heads.png"}:
        assert Image.open(out / name).size == (72, 40)
    picture = np.asarray(Image.open(out / "img.png"))
    assert np.array_equal(picture, rgb[:40, :72])  # fits the box as it is: cropped, not resized

    torch.manual_seed(0)  # the same random weights again
    model = build_vit("vit_tiny", 8).eval()
    attention = cls_attention(model, prepare(rgb, 8, (43, 75))[1], torch.device("cpu"))
    masks = threshold_masks(attention, 0.6).repeat_interleave(8, 1).repeat_interleave(8, 2).numpy()
    for j, colour in enumerate(head_colors(heads)):
        tinted = np.asarray(Image.open(out / f"mask_th0.6_head{j}.png"))
        assert np.array_equal((tinted != picture).any(axis=2), masks[j])
        assert 0 < masks[j].mean() < 1


def test_visualize_attention_default_image_and_bad_input(tmp_path):
    written = visualize_attention.main(args_for(tmp_path, "--image_size", "64"))
    assert Image.open(written[0]).size == (64, 64)  # the embedded 64x64 picture, patch grid 8x8
    with pytest.raises(UserError, match="does not exist"):
        visualize_attention.main(args_for(tmp_path, "--image_path", str(tmp_path / "missing.jpg")))
    with pytest.raises(UserError, match="threshold"):
        visualize_attention.main(args_for(tmp_path, "--threshold", "60"))
