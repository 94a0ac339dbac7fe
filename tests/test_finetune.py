"""Fine-tuning: layer-wise lr decay, weight sources, position-embedding resizing, evaluation, resume, real data."""
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import RandAugment

import main_finetune
import main_pretrain_mae
from core.augment import eval_resize, eval_transform, finetune_transform
from core.config import parse_args
from core.dino import DINOHead, MultiCropWrapper
from core.errors import UserError, run_cli
from core.mae import MaskedAutoencoderViT
from core.optim import build_optimizer, param_groups_layer_decay, set_lr
from core.vision_transformer import VisionTransformer

TINY = ["--arch", "vit_tiny", "--embed_dim", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8",
        "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "1",
        "--saveckp_freq", "1", "--device", "cpu", "--precision", "fp32"]
# The small model of the real-data runs: 64 wide, 2 blocks, 4 px patches on 32 px images (an 8x8 grid).
SMALL = ["--arch", "vit_tiny", "--embed_dim", "64", "--depth", "2", "--num_heads", "2", "--patch_size", "4",
         "--input_size", "32", "--num_workers", "0", "--device", "cpu", "--precision", "fp32"]


def vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    return VisionTransformer(**{**args, **kw})


def make_split(folder, classes, per_class, size=36, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i:03d}.png")
    return folder


def run(argv):
    return main_finetune.main(parse_args(main_finetune.get_args_parser(), "main_finetune", argv))


def test_layer_decay_values_against_formula():
    model = vit(depth=3, num_classes=5, global_pool="avg")
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay=model.no_weight_decay(),
                                      layer_decay=0.75)
    group_of = {id(p): g for g in groups for p in g["params"]}
    # MAE: num_layers = depth + 1 = 4; embeddings are layer 0, blocks.i layer i + 1, the rest layer 4;
    # lr_scale = 0.75^(4 - layer); no weight decay on 1-d parameters, pos_embed and cls_token.
    hand = {"patch_embed.proj.weight": (0.31640625, 0.05), "cls_token": (0.31640625, 0.0),
            "pos_embed": (0.31640625, 0.0), "blocks.0.attn.qkv.weight": (0.421875, 0.05),
            "blocks.1.mlp.fc1.bias": (0.5625, 0.0), "blocks.2.norm1.weight": (0.75, 0.0),
            "fc_norm.weight": (1.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    for name, p in model.named_parameters():
        layer = 0 if name in ("cls_token", "pos_embed") or name.startswith("patch_embed") else (
            int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 4)
        decay = 0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05
        g = group_of[id(p)]
        assert g["lr_scale"] == pytest.approx(0.75 ** (4 - layer)) and g["weight_decay"] == decay, name
        if name in hand:
            assert (g["lr_scale"], g["weight_decay"]) == pytest.approx(hand[name]), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer("adamw", groups)
    set_lr(optimizer, 2e-3)
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == pytest.approx(
        [2e-3 * 0.75 ** k for k in (4, 3, 2, 1, 0)])


def test_finetune_transform_survives_posterize_at_top_magnitude():
    transform = finetune_transform(32)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops]
    assert [op.name for op in ops if op.name.startswith("Posterize")] == ["PosterizeIncreasing"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    op = next(op for op in ops if op.name == "PosterizeIncreasing")
    assert np.asarray(op.aug_fn(img, 0)).max() == 0  # 0 bits kept: black, as older Pillow gave
    assert np.array_equal(np.asarray(op.aug_fn(img, 2)), np.asarray(img) & 0b11000000)
    assert transform(img.resize((40, 40))).shape == (3, 32, 32)


def dino_checkpoint(backbone):
    head = DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16)
    wrapped = MultiCropWrapper(backbone, head)
    return {"student": {f"module.{k}": v for k, v in wrapped.state_dict().items()}, "teacher": wrapped.state_dict(),
            "optimizer": {}, "epoch": 3, "args": {"arch": "vit_small"}}


def assert_encoder_loaded(model, source_sd):
    for name, value in model.state_dict().items():
        if not name.startswith(("head.", "fc_norm.", "norm.")):
            assert torch.equal(value, source_sd[name]), name


def test_sources_load_with_head_dropped(tmp_path):
    torch.manual_seed(0)
    backbone = vit()
    mae = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2)
    finetuned = vit(num_classes=9, global_pool="avg")
    sources = {"dino.pth": (dino_checkpoint(backbone), backbone.state_dict()),
               "dino_backbone.pth": (backbone.state_dict(), backbone.state_dict()),
               "mae_full.pth": ({"model": mae.state_dict(), "epoch": 799}, mae.state_dict()),
               "mae_finetuned.pth": ({"model": finetuned.state_dict()}, finetuned.state_dict())}
    for name, (content, sd) in sources.items():
        torch.save(content, tmp_path / name)
        for pool in ("avg", "token"):
            model = vit(num_classes=5, global_pool=pool)
            main_finetune.load_finetune_weights(model, tmp_path / name)
            assert_encoder_loaded(model, sd)
            assert model.head.weight.std().item() < 1e-4  # re-initialised with std 2e-5
            if pool == "token" and "norm.weight" in sd:
                assert torch.equal(model.norm.weight, sd["norm.weight"])


def test_timm_state_dict_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    for pool in ("avg", "token"):
        ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                               num_heads=3, num_classes=7, global_pool=pool).eval()
        torch.save(ref.state_dict(), tmp_path / "timm.pth")
        model = vit(num_classes=5, global_pool=pool)
        main_finetune.load_finetune_weights(model, tmp_path / "timm.pth")
        model.head = torch.nn.Identity()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
            assert torch.allclose(model.eval()(x), expected, atol=1e-5)


def test_pos_embed_interpolated_on_load(tmp_path):
    torch.manual_seed(0)
    source = vit()  # 32 px, 8 px patches: a 4x4 grid
    torch.save({"model": source.state_dict()}, tmp_path / "src.pth")
    model = vit(img_size=48, num_classes=3, global_pool="avg")  # 48 px: a 6x6 grid
    main_finetune.load_finetune_weights(model, tmp_path / "src.pth")
    grid = source.pos_embed[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert model.pos_embed.shape == (1, 37, 48)
    assert torch.equal(model.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.allclose(model.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 48), atol=1e-6)
    # An embedding that varies along the columns only still does after resizing: all 6 rows are equal.
    with torch.no_grad():
        source.pos_embed[:, 1:] = torch.randn(1, 1, 4, 48).expand(1, 4, 4, 48).reshape(1, 16, 48)
    torch.save({"model": source.state_dict()}, tmp_path / "src.pth")
    main_finetune.load_finetune_weights(model, tmp_path / "src.pth")
    rows = model.pos_embed[0, 1:].reshape(6, 6, 48)
    assert torch.allclose(rows, rows[:1].expand(6, 6, 48), atol=1e-6) and not torch.allclose(rows[0, 0], rows[0, 1])


def test_source_of_another_width_or_depth_is_one_line(tmp_path, capsys):
    torch.save(dino_checkpoint(vit(embed_dim=96)), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="width 96 but the model is 48 wide"):
        main_finetune.load_finetune_weights(vit(num_classes=2), tmp_path / "wide.pth")
    torch.save(vit(depth=3).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(UserError, match=r"unexpected keys \['blocks\.2\."):
        main_finetune.load_finetune_weights(vit(num_classes=2), tmp_path / "deep.pth")
    data = tmp_path / "data"
    make_split(data / "train", "ab", 4)
    make_split(data / "val", "ab", 2)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: run(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                                    "--finetune", str(tmp_path / "wide.pth")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "width 96" in err
    with pytest.raises(UserError, match="not divisible by the patch size 8"):
        run(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--input_size", "36"])
    with pytest.raises(UserError, match="has no val/ folder"):
        run(TINY + ["--data_path", str(data / "train"), "--output_dir", str(tmp_path / "out")])


def test_eval_top1_top5_against_brute_force(tmp_path):
    classes = [f"c{i}" for i in range(7)]
    data = tmp_path / "data"
    make_split(data / "train", classes, 1)
    make_split(data / "test", classes, 3, seed=1)  # a test/ folder stands in for val/
    torch.manual_seed(0)
    model = vit(num_classes=7, global_pool="avg").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "classifier.pth")
    stats = run(TINY + ["--eval", "--resume", str(tmp_path / "classifier.pth"), "--data_path", str(data),
                        "--output_dir", str(tmp_path / "out")])
    transform = eval_transform(eval_resize(32), 32)
    top1 = top5 = 0
    for label, c in enumerate(classes):
        for f in sorted((data / "test" / c).iterdir()):
            with torch.no_grad():
                logits = model(transform(Image.open(f).convert("RGB"))[None])[0]
            rank = (logits > logits[label]).sum().item()
            top1, top5 = top1 + (rank == 0), top5 + (rank < 5)
    assert stats["images"] == 21
    assert stats["acc1"] == pytest.approx(100 * top1 / 21) and stats["acc5"] == pytest.approx(100 * top5 / 21)
    assert 0 < stats["acc5"] < 100  # the check is not vacuous
    direct = run(TINY + ["--eval", "--resume", str(tmp_path / "classifier.pth"), "--data_path", str(data / "test"),
                         "--output_dir", str(tmp_path / "out")])
    assert direct == stats  # a class folder tree given directly
    assert eval_resize(224) == 256 and eval_resize(32) == 36 and eval_resize(384) == 384


def test_resume_is_exact_with_the_full_recipe(tmp_path):
    """Mixup, cutmix, RandAugment, random erasing and label smoothing on (the defaults), 2 epochs vs 1 + 1."""
    data = tmp_path / "data"
    make_split(data / "train", "abc", 4)
    make_split(data / "val", "abc", 2, seed=1)
    args = TINY + ["--data_path", str(data)]
    run(args + ["--output_dir", str(tmp_path / "once")])
    interrupted = tmp_path / "twice"
    run(args + ["--output_dir", str(interrupted)])
    shutil.copy(interrupted / "checkpoint-0.pth", interrupted / "checkpoint.pth")
    (interrupted / "log.txt").write_text((interrupted / "log.txt").read_text().splitlines()[0] + "\n")
    run(args + ["--output_dir", str(interrupted)])
    once = torch.load(tmp_path / "once" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "max_accuracy"} <= set(once) and once["epoch"] == 1
    for k in once["model"]:
        assert torch.equal(once["model"][k], resumed["model"][k]), k
    assert (tmp_path / "once" / "log.txt").read_text() == (interrupted / "log.txt").read_text()
    records = [json.loads(line) for line in (interrupted / "log.txt").read_text().splitlines()]
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "max_accuracy", "epoch"} <= set(records[0])
    assert records[1]["max_accuracy"] == max(r["test_acc1"] for r in records)
    best = torch.load(interrupted / "checkpoint-best.pth", weights_only=True)
    assert best["acc1"] == records[1]["max_accuracy"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_split(data / "train", "ab", 4)
    make_split(data / "val", "ab", 2)
    out = tmp_path / "out"
    run(TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(out)])
    before = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(main_finetune.SoftTargetCrossEntropy, "forward", lambda self, x, t: x.sum() * math.nan)
    with pytest.raises(UserError, match=r"loss is nan at iteration 2 \(epoch 1\)"):
        run(TINY + ["--data_path", str(data), "--output_dir", str(out)])
    assert (out / "checkpoint.pth").read_bytes() == before


def final_accuracy(out_dir):
    return json.loads((out_dir / "log.txt").read_text().splitlines()[-1])["test_acc1"]


def test_imagenette_subset_from_mae_beats_chance(tmp_path, shared_data):
    """MAE pretraining for one epoch, then fine-tuning from its checkpoint, on 5 Imagenette classes at 32 px."""
    source = shared_data / "imagenette-160"
    classes = [sorted(os.listdir(source / "train"))[i] for i in (0, 4, 6, 8, 9)]
    data = tmp_path / "imagenette"
    for split, n in (("train", 60), ("val", 30)):
        for c in classes:
            (data / split / c).mkdir(parents=True)
            for name in sorted(os.listdir(source / split / c))[:n]:
                os.symlink(source / split / c / name, data / split / c / name)
    mae_args = SMALL + ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
                        "--batch_size", "32", "--epochs", "1", "--warmup_epochs", "0", "--recon_freq", "0",
                        "--norm_pix_loss", "--data_path", str(data / "train"), "--output_dir", str(tmp_path / "mae")]
    main_pretrain_mae.main(parse_args(main_pretrain_mae.get_args_parser(), "main_pretrain_mae", mae_args))
    run(SMALL + ["--finetune", str(tmp_path / "mae" / "checkpoint.pth"), "--batch_size", "32", "--epochs", "8",
                 "--warmup_epochs", "1", "--lr", "2e-3", "--mixup", "0", "--cutmix", "0", "--aa", "none",
                 "--saveckp_freq", "0", "--data_path", str(data), "--output_dir", str(tmp_path / "ft")])
    assert final_accuracy(tmp_path / "ft") >= 32.0  # chance: 20% on 150 images


def extract_cifar(archive, dst, per_class):
    """The first `per_class` images of each class and split; the archive's test/ becomes val/."""
    counts = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4:
                continue
            _, split, cls, name = parts
            if counts.get((split, cls), 0) >= per_class[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            out = dst / ("val" if split == "test" else split) / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return dst


def test_cifar10_32px_small_patch_beats_chance(tmp_path, shared_data):
    data = extract_cifar(shared_data / "cifar10-jpg.tar.gz", tmp_path / "cifar", {"train": 60, "test": 20})
    assert len(list((data / "train").iterdir())) == 10
    run(SMALL + ["--batch_size", "32", "--epochs", "8", "--warmup_epochs", "1", "--lr", "2e-3", "--mixup", "0",
                 "--cutmix", "0", "--aa", "none", "--saveckp_freq", "0", "--data_path", str(data),
                 "--output_dir", str(tmp_path / "ft")])
    assert final_accuracy(tmp_path / "ft") >= 20.0  # chance: 10% on 200 images
