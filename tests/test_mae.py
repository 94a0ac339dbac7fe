"""MAE: masking, loss, position tables, official layouts, and main_pretrain_mae.py runs (resume, hygiene, pictures)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main_pretrain_mae
import visualize_mae
from conftest import make_images, one_line_error
from core.checkpoint import load_pretrained_weights
from core.config import parse_args
from core.errors import UserError
from core.mae import (MaskedAutoencoderViT, is_decoder_key, load_mae, patchify, random_masking, reconstruct,
                      unpatchify)
from core.schedule import cosine_schedule
from core.vision_transformer import VisionTransformer, resample_pos_embed, sincos_pos_embed_2d

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--embed_dim", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8",
        "--input_size", "32", "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
        "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2", "--num_workers", "1",
        "--saveckp_freq", "1", "--recon_freq", "0", "--device", "cpu", "--precision", "fp32"]


def tiny_mae(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)
    return MaskedAutoencoderViT(**{**args, **kw})


def run(argv):
    return main_pretrain_mae.main(parse_args(main_pretrain_mae.get_args_parser(), "main_pretrain_mae", argv))


def load(path):
    return torch.load(path, weights_only=True)


def test_sincos_table_matches_formula():
    dim, gh, gw = 8, 2, 3
    emb = sincos_pos_embed_2d(dim, (gh, gw), cls_token=True)
    assert emb.shape == (1 + gh * gw, dim) and torch.equal(emb[0], torch.zeros(dim))
    omega = [1.0, 1.0 / 100.0]  # 1 / 10000^(k / (dim / 4)), k = 0, 1
    for r in range(gh):
        for c in range(gw):
            expected = ([math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
                        + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega])
            assert torch.allclose(emb[1 + r * gw + c], torch.tensor(expected), atol=1e-6)
    assert emb[1 + 1 * gw + 2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)  # column 2 in the first half


def test_patchify_layout_and_inverse():
    imgs = torch.randn(2, 3, 8, 12)
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 48)
    n, i, j, u, v, ch = 1, 1, 2, 3, 1, 2  # patch (row 1, column 2), pixel (3, 1) inside it, channel 2
    assert x[n, i * 3 + j, (u * 4 + v) * 3 + ch] == imgs[n, ch, i * 4 + u, j * 4 + v]
    assert torch.equal(unpatchify(x, 4, (2, 3)), imgs)


def test_random_masking_properties():
    torch.manual_seed(0)
    B, L, D, ratio = 6, 16, 5, 0.75
    x = torch.randn(B, L, D)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert kept.shape == (B, keep, D)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    kept_sets = [frozenset(torch.nonzero(mask[b] == 0).flatten().tolist()) for b in range(B)]
    assert len(set(kept_sets)) == B  # a different kept set per sample
    for b in range(B):  # kept tokens are exactly the unmasked ones, in noise order
        assert {tuple(t.tolist()) for t in kept[b]} == {tuple(x[b, j].tolist()) for j in kept_sets[b]}
    # [kept, removed] gathered with ids_restore is the original sequence, exactly.
    ids_shuffle = ids_restore.argsort(dim=1)
    removed = x.gather(1, ids_shuffle[:, keep:].unsqueeze(-1).expand(-1, -1, D))
    restored = torch.cat((kept, removed), 1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(restored, x)


def test_mask_ratio_and_image_size_errors():
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="strictly between 0 and 1"):
            main_pretrain_mae.check_args(parse_args(main_pretrain_mae.get_args_parser(), "main_pretrain_mae",
                                                    ["--mask_ratio", str(ratio)]))
    with pytest.raises(UserError, match="keeps no patch"):
        random_masking(torch.zeros(1, 4, 2), 0.9)
    with pytest.raises(UserError, match="not divisible by the patch size 8"):
        tiny_mae(img_size=36)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.randn(3, 3, 32, 32)
    _, mask, _ = random_masking(torch.zeros(3, 16, 1), 0.75)
    pred = torch.randn(3, 16, 192)
    per_patch = ((pred - patchify(imgs, 8)) ** 2).mean(-1)
    expected = sum(per_patch[b, j] for b in range(3) for j in range(16) if mask[b, j]) / mask.sum()
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    visible = pred + 5.0 * (1 - mask).unsqueeze(-1)  # change only the predictions of visible patches
    assert model.forward_loss(imgs, visible, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    removed = pred + 5.0 * mask.unsqueeze(-1)
    assert model.forward_loss(imgs, removed, mask).item() > expected.item() + 1.0


def test_norm_pix_target_hand_computed():
    # One channel, 2x2 patches: the patch [[0, 1], [2, 3]] has mean 1.5 and unbiased variance 5/3, so with a zero
    # prediction its loss is mean((x - 1.5)^2) / (5/3 + 1e-6) = 1.25 / (5/3 + 1e-6).
    model = MaskedAutoencoderViT(img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                                 decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs = torch.zeros(1, 1, 4, 4)
    imgs[0, 0, :2, :2] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    target = model.target(imgs)
    assert torch.allclose(target[0, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3 + 1e-6))
    assert torch.allclose(target[0, 1:], torch.zeros(3, 4))  # flat patches: (0 - 0) / sqrt(0 + 1e-6)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    loss = model.forward_loss(imgs, torch.zeros(1, 4, 4), mask)
    assert loss.item() == pytest.approx(1.25 / (5 / 3 + 1e-6), rel=1e-6)


def test_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    assert seen == [torch.Size([2, 1 + 4, 48])] and latent.shape == (2, 5, 48)
    # Changing the pixels of removed patches leaves the encoder's output unchanged.
    scribbled = unpatchify(patchify(imgs, 8) + 10.0 * mask.unsqueeze(-1), 8, (4, 4))
    assert torch.equal(model.forward_encoder(scribbled, 0.75, noise)[0], latent)
    _, pred, _ = model(imgs, 0.75, noise)
    assert pred.shape == (2, 16, 8 * 8 * 3)


def test_reconstruction_keeps_visible_patches():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    masked, pasted = reconstruct(model, imgs, 0.75, noise)
    _, pred, mask = model(imgs, 0.75, noise)
    m = mask.unsqueeze(-1)
    assert torch.allclose(patchify(pasted, 8), patchify(imgs, 8) * (1 - m) + pred * m)
    assert torch.equal(patchify(masked, 8) * m, torch.zeros(2, 16, 192))


def official_state_dict():
    """The key layout of facebookresearch/mae's models_mae.py for a depth-2 encoder and depth-1 decoder."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(2) for k in block} | {f"decoder_blocks.0.{k}" for k in block}
    return keys


def test_official_layout_and_fixed_position_tables():
    model = tiny_mae()
    sd = model.state_dict()
    assert set(sd) == official_state_dict()
    assert sd["mask_token"].shape == (1, 1, 32) and sd["decoder_pred.weight"].shape == (8 * 8 * 3, 32)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(sd["pos_embed"][0], sincos_pos_embed_2d(48, 4, cls_token=True))
    assert torch.equal(sd["decoder_pos_embed"][0], sincos_pos_embed_2d(32, 4, cls_token=True))


def test_official_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    # A file like mae_visualize_vit_*.pth: {'model': encoder + decoder}, no args; 192 wide -> 3 heads (ViT-Ti).
    source = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3,
                                  decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=16).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "with_decoder.pth")
    loaded = load_mae(tmp_path / "with_decoder.pth").eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert torch.equal(loaded(imgs, 0.75, noise)[1], source(imgs, 0.75, noise)[1])
    # A file like mae_pretrain_vit_*.pth: {'model': encoder only}; it is a ViT backbone for every evaluation.
    encoder = {k: v for k, v in source.state_dict().items() if not is_decoder_key(k)}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3)
    assert load_pretrained_weights(vit, tmp_path / "encoder.pth", "model") == ([], [])
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(vit.eval().forward_features(x), source.forward_features(x), atol=1e-6)
    with pytest.raises(UserError, match="has no MAE decoder"):
        load_mae(tmp_path / "encoder.pth")


def test_half_cycle_cosine_matches_mae_lr_sched():
    # MAE sets, every accum_iter micro-batches, lr = f(epoch + step / len(loader)) with a linear warm-up from 0 and a
    # half-cycle cosine to min_lr: our per-optimizer-step schedule must give the same value at each such step.
    lr, min_lr, epochs, warmup, steps, accum = 1.0, 0.1, 4, 1, 5, 2

    def mae_lr(epoch):
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

    schedule = cosine_schedule(lr, min_lr, epochs, steps, warmup, warmup_endpoint=False)
    assert len(schedule) == epochs * steps
    for epoch in range(epochs):
        for i in range(0, steps * accum, accum):
            assert schedule[epoch * steps + i // accum] == pytest.approx(mae_lr(epoch + i / (steps * accum)))
    assert schedule[0] == 0.0 and schedule[steps] == pytest.approx(lr)


def test_resume_is_exact(tmp_path):
    data = make_images(tmp_path / "data", 8)
    run(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "once")])
    interrupted = tmp_path / "twice"
    run(TINY + ["--data_path", str(data), "--output_dir", str(interrupted)])
    # A run killed after its first epoch: only the epoch-0 checkpoint and its log line survive.
    shutil.copy(interrupted / "checkpoint-0.pth", interrupted / "checkpoint.pth")
    (interrupted / "log.txt").write_text((interrupted / "log.txt").read_text().splitlines()[0] + "\n")
    run(TINY + ["--data_path", str(data), "--output_dir", str(interrupted)])
    once, resumed = load(tmp_path / "once" / "checkpoint.pth"), load(interrupted / "checkpoint.pth")
    assert once["epoch"] == resumed["epoch"] == 1
    assert once["model"].keys() == resumed["model"].keys()
    for k in once["model"]:
        assert torch.equal(once["model"][k], resumed["model"][k]), k
    assert (tmp_path / "once" / "log.txt").read_text() == (interrupted / "log.txt").read_text()
    losses = [json.loads(line)["train_loss"] for line in (interrupted / "log.txt").read_text().splitlines()]
    assert all(math.isfinite(v) for v in losses)


def test_checkpoint_layout_reconstruction_and_visualize(tmp_path):
    data = make_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    run(TINY + ["--epochs", "1", "--recon_freq", "1", "--recon_images", "3", "--norm_pix_loss", "--data_path",
                str(data), "--output_dir", str(out)])
    ckpt = load(out / "checkpoint.pth")
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt) and ckpt["epoch"] == 0
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["norm_pix_loss"] is True
    assert set(ckpt["model"]) == official_state_dict()
    record = json.loads((out / "log.txt").read_text())
    assert record["epoch"] == 0 and math.isfinite(record["train_loss"])
    # One row per image, three columns (original, masked, reconstruction) of 32 px with 2 px padding.
    assert Image.open(out / "reconstruction-0.png").size == (2 + 3 * 34, 2 + 3 * 34)
    picture = tmp_path / "pictures" / "r.png"
    args = visualize_mae.get_args_parser().parse_args(["--checkpoint", str(out / "checkpoint.pth"), "--data_path",
                                                       str(data), "--output", str(picture), "--num_images", "2"])
    visualize_mae.main(args)
    assert Image.open(picture).size == (2 + 3 * 34, 2 + 2 * 34)
    model = load_mae(out / "checkpoint.pth")
    assert model.norm_pix_loss and model.embed_dim == 48 and len(model.blocks) == 2


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    run(TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(out)])
    before = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", lambda self, imgs, pred, mask: pred.sum() * math.nan)
    with pytest.raises(UserError, match=r"loss is nan at iteration 2 \(epoch 1\)"):
        run(TINY + ["--data_path", str(data), "--output_dir", str(out)])
    assert (out / "checkpoint.pth").read_bytes() == before


def test_bad_input_is_one_line(tmp_path, capsys):
    def cli_error(argv):
        return one_line_error(lambda: run(argv), capsys)

    data = make_images(tmp_path / "data", 8)
    out = ["--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    assert "--mask_ratio 1.0 must lie strictly between 0 and 1" in cli_error(TINY + out + ["--mask_ratio", "1.0"])
    assert "not divisible by the patch size 8" in cli_error(TINY + out + ["--input_size", "36"])
    assert "unknown config" in cli_error(["--config", "nope"])
    proc = subprocess.run([sys.executable, "main_pretrain_mae.py", "--mask_ratio", "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_pos_embed_resample_identity_and_constant():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4)) is pe
    const = torch.cat((torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.3)), dim=1)
    out = resample_pos_embed(const, (6, 6))
    assert out.shape == (1, 37, 8) and torch.equal(out[:, :1], const[:, :1])
    assert torch.allclose(out[:, 1:], torch.full((1, 36, 8), 0.3), atol=1e-6)
    with pytest.raises(UserError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
