"""Masked autoencoder (He et al., 2022) over the shared ViT, with the state-dict keys of facebookresearch/mae.

The encoder is our VisionTransformer (cls_token, pos_embed, patch_embed.proj, blocks.N, norm), so an MAE checkpoint's
encoder loads into every evaluation as it is; the decoder adds decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks.N, decoder_norm and decoder_pred. Both position embeddings are fixed sine-cosine tables.
"""
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from core.augment import IMAGENET_MEAN, IMAGENET_STD, eval_resize, eval_transform
from core.checkpoint import load_file, strip_prefixes
from core.custom_ops import gather_tokens
from core.data import ImageDataset
from core.errors import UserError
from core.vision_transformer import (SIZES, Block, LayerNorm, VisionTransformer, arch_sizes, check_image_size,
                                     sincos_pos_embed_2d)

# Heads of the official MAE encoders by width (mae_vit_base/large/huge), for files that carry no args.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def check_mask_ratio(mask_ratio):
    if not 0.0 < mask_ratio < 1.0:
        raise UserError(f"--mask_ratio {mask_ratio} must lie strictly between 0 and 1 (MAE uses 0.75)")


def patchify(imgs, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): patches row-major, each flattened as (row, column, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, grid_size, channels=3):
    """Inverse of patchify for a (rows, columns) patch grid."""
    gh, gw = grid_size
    x = x.reshape(x.shape[0], gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, gh * p, gw * p)


class WithMaskNoise:
    """An image transform that also draws the image's masking noise (uniform, one value a patch, as random_masking
    draws it), under the dataset's per-image seed: the mask an image gets then depends neither on the process that
    trains on it nor on where a resumed run starts, so runs on any number of processes mask alike."""

    def __init__(self, transform, num_patches):
        self.transform, self.num_patches = transform, num_patches

    def __call__(self, image):
        return self.transform(image), torch.rand(self.num_patches)


def random_masking(x, mask_ratio, noise=None):
    """Keep a random int(L * (1 - mask_ratio)) tokens per sample: the lowest values of uniform noise.

    Returns the kept tokens, the binary mask (1 = removed) in the original order, and ids_restore, which puts the
    concatenation [kept, removed] back in the original order.
    """
    B, L = x.shape[:2]
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise UserError(f"--mask_ratio {mask_ratio} keeps no patch of {L}: lower it")
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = gather_tokens(x, ids_keep)
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MaskedAutoencoderViT(VisionTransformer):
    """MAE: the encoder sees only the visible patches, a light decoder reconstructs the pixels of all of them."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False,
                 fused_attn=True):
        check_image_size(img_size, patch_size)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, fused_attn=fused_attn)
        self.norm_pix_loss = norm_pix_loss
        self.pos_embed.requires_grad_(False)
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, fused_attn=fused_attn)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """MAE's initialisation: sine-cosine tables, xavier-uniform linears and patch projection (as a linear)."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input(self, imgs):
        if tuple(imgs.shape[-2:]) != tuple(g * self.patch_size for g in self.patch_embed.grid_size):
            raise UserError(f"MAE input of {tuple(imgs.shape[-2:])} px does not match the model's "
                            f"{self.patch_embed.grid_size[0] * self.patch_size} px: set --input_size to it")

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """Visible tokens plus mask tokens, un-shuffled to image order; returns per-patch pixels (no [CLS])."""
        x = self.decoder_embed(x)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        patches = torch.cat((x[:, 1:], mask_tokens), dim=1)
        patches = gather_tokens(patches, ids_restore)
        x = torch.cat((x[:, :1], patches), dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs):
        """Pixels per patch; with norm_pix_loss normalised by the patch's mean and (unbiased) variance."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the removed patches only."""
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        self.check_input(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def is_decoder_key(name):
    return name.startswith("decoder_") or name == "mask_token"


def build_mae(arch="vit_base", patch_size=16, img_size=224, embed_dim=None, depth=None, num_heads=None, **kwargs):
    """MAE on one of our ViT sizes (each overridable); decoder sizes and norm_pix_loss pass through."""
    embed_dim, depth, num_heads = arch_sizes(arch, embed_dim, depth, num_heads)
    return MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                num_heads=num_heads, **kwargs)


def _count_blocks(sd, prefix):
    return len({int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})


def load_mae(path):
    """An MAE with decoder from our checkpoint.pth or an official file with decoder (mae_visualize_vit_*.pth).

    Sizes come from the tensors' shapes; heads, which shapes cannot tell, from the stored args when they are ours,
    else from the official models' widths with 16 decoder heads.
    """
    ckpt = load_file(path)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    sd = strip_prefixes(ckpt.get("model", ckpt), ("module.", "_orig_mod."))
    if "decoder_pred.weight" not in sd:
        raise UserError(f"{path} has no MAE decoder (an encoder-only or non-MAE file): reconstructions need a "
                        f"checkpoint with the decoder, such as our pretraining checkpoint.pth")
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    proj = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    if args.get("arch") in SIZES:
        num_heads = args.get("num_heads") or SIZES[args["arch"]][2]
    elif embed_dim in HEADS_BY_WIDTH:
        num_heads = HEADS_BY_WIDTH[embed_dim]
    else:
        raise UserError(f"{path}: cannot tell the number of heads of a {embed_dim}-wide encoder without its args")
    model = MaskedAutoencoderViT(
        img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
        depth=_count_blocks(sd, "blocks"), num_heads=num_heads, decoder_embed_dim=sd["mask_token"].shape[-1],
        decoder_depth=_count_blocks(sd, "decoder_blocks"), decoder_num_heads=args.get("decoder_num_heads", 16),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        norm_pix_loss=bool(args.get("norm_pix_loss", False)))
    model.load_state_dict(sd)
    return model


def denormalize(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio=0.75, noise=None):
    """(masked input, reconstruction with the visible patches pasted back), normalised like imgs.

    A norm_pix_loss model predicts normalised patches; they are mapped back with each patch's own mean and
    variance, as the MAE paper's figures do.
    """
    _, pred, mask = model(imgs, mask_ratio, noise)
    target = patchify(imgs, model.patch_size)
    if model.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    grid, channels = model.patch_embed.grid_size, imgs.shape[1]
    mask = mask.unsqueeze(-1)
    masked = unpatchify(target * (1 - mask), model.patch_size, grid, channels)
    pasted = unpatchify(target * (1 - mask) + pred * mask, model.patch_size, grid, channels)
    return masked, pasted


def save_reconstruction(model, imgs, path, mask_ratio=0.75, seed=0):
    """A PNG with one row per image: original, masked (removed patches grey), reconstruction. A fixed seed keeps
    the same masks from epoch to epoch, so pictures of one run compare. path None computes without writing: the
    other processes of a sharded (--fsdp) model, whose forward is a collective."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=generator).to(imgs.device)
    masked, pasted = reconstruct(model, imgs, mask_ratio, noise)
    model.train(was_training)
    if path is None:
        return None
    rows = torch.stack((denormalize(imgs), denormalize(masked), denormalize(pasted)), dim=1).flatten(0, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows.float().cpu(), nrow=3, padding=2, pad_value=1.0), path)
    return path


def sample_images(data_path, input_size, n=8):
    """n evenly spaced images of a folder, centre-cropped: the same pictures from epoch to epoch and across classes."""
    dataset = ImageDataset(data_path, eval_transform(eval_resize(input_size), input_size))
    picks = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    images = [item[0] for item in (dataset[int(i)] for i in picks) if item is not None]
    if not images:
        raise UserError(f"no readable image among those picked in {data_path}: check the folder")
    return torch.stack(images)
