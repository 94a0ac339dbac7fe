"""The originals' command lines: every flag of facebookresearch/dino and facebookresearch/mae parses with its meaning,
including the legacy launcher's --local-rank, DINO's --use_fp16, MAE's model names, --resume and --start_epoch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import eval_knn
import eval_linear
import main_dino
import main_finetune
import main_pretrain_mae
from conftest import make_images, one_line_error
from core.checkpoint import resume_run
from core.config import parse_args
from core.vision_transformer import VisionTransformer, arch_sizes

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"main_dino": main_dino, "eval_knn": eval_knn, "eval_linear": eval_linear,
           "main_pretrain_mae": main_pretrain_mae, "main_finetune": main_finetune}
DINO_TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--global_crops_size", "32",
             "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "8", "--epochs", "1",
             "--warmup_epochs", "1", "--num_workers", "0", "--drop_path_rate", "0", "--device", "cpu"]
MAE_TINY = ["--arch", "vit_tiny", "--embed_dim", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8",
            "--input_size", "32", "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
            "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2", "--num_workers", "0",
            "--saveckp_freq", "1", "--recon_freq", "0", "--device", "cpu", "--precision", "fp32"]


def parse(script, argv):
    return parse_args(SCRIPTS[script].get_args_parser(), script, argv)


def cli_error(script, argv, capsys):
    return one_line_error(lambda: parse(script, argv), capsys)


@pytest.fixture
def clean_env(monkeypatch):
    """The distributed variables as a plain process has them (none), restored after the test."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
    for name in names:
        monkeypatch.setenv(name, "unset")  # recorded, so that whatever the test sets is undone
        monkeypatch.delenv(name)
    return monkeypatch


# The originals' flags with a non-default value each and the attribute value that means the same here.
DINO_FLAGS = {
    "main_dino": [("--arch", "vit_tiny", "vit_tiny"), ("--patch_size", "8", 8), ("--out_dim", "4096", 4096),
                  ("--norm_last_layer", "false", False), ("--momentum_teacher", "0.9995", 0.9995),
                  ("--use_bn_in_head", "true", True), ("--warmup_teacher_temp", "0.03", 0.03),
                  ("--teacher_temp", "0.07", 0.07), ("--warmup_teacher_temp_epochs", "30", 30),
                  ("--weight_decay", "0.05", 0.05), ("--weight_decay_end", "0.3", 0.3), ("--clip_grad", "0.3", 0.3),
                  ("--batch_size_per_gpu", "32", 32), ("--epochs", "300", 300), ("--freeze_last_layer", "3", 3),
                  ("--lr", "0.00075", 0.00075), ("--warmup_epochs", "5", 5), ("--min_lr", "2e-6", 2e-6),
                  ("--optimizer", "sgd", "sgd"), ("--drop_path_rate", "0.2", 0.2),
                  ("--local_crops_number", "10", 10), ("--data_path", "/d", "/d"), ("--output_dir", "/o", "/o"),
                  ("--saveckp_freq", "10", 10), ("--seed", "3", 3), ("--num_workers", "4", 4),
                  ("--dist_url", "env://", "env://"), ("--local_rank", "0", 0), ("--use_fp16", "false", False)],
    "eval_knn": [("--batch_size_per_gpu", "64", 64), ("--temperature", "0.1", 0.1),
                 ("--pretrained_weights", "w.pth", "w.pth"), ("--use_cuda", "false", False),
                 ("--arch", "vit_base", "vit_base"), ("--patch_size", "8", 8), ("--checkpoint_key", "student",
                                                                                 "student"),
                 ("--dump_features", "/f", "/f"), ("--load_features", "/g", "/g"), ("--num_workers", "4", 4),
                 ("--dist_url", "env://", "env://"), ("--local_rank", "0", 0), ("--data_path", "/d", "/d")],
    "eval_linear": [("--n_last_blocks", "1", 1), ("--avgpool_patchtokens", "true", True),
                    ("--arch", "vit_base", "vit_base"), ("--patch_size", "8", 8),
                    ("--pretrained_weights", "w.pth", "w.pth"), ("--checkpoint_key", "student", "student"),
                    ("--epochs", "50", 50), ("--batch_size_per_gpu", "64", 64), ("--dist_url", "env://", "env://"),
                    ("--local_rank", "0", 0), ("--data_path", "/d", "/d"), ("--num_workers", "4", 4),
                    ("--val_freq", "5", 5), ("--output_dir", "/o", "/o"), ("--num_labels", "100", 100)],
}
MAE_COMMON = [("--batch_size", "32", 32), ("--epochs", "10", 10), ("--accum_iter", "4", 4),
              ("--input_size", "192", 192), ("--weight_decay", "0.3", 0.3), ("--lr", "0.001", 0.001),
              ("--blr", "5e-4", 5e-4), ("--min_lr", "1e-5", 1e-5), ("--warmup_epochs", "3", 3),
              ("--data_path", "/d", "/d"), ("--output_dir", "/o", "/o"), ("--log_dir", "/l", "/l"),
              ("--device", "cuda", "cuda"), ("--seed", "3", 3), ("--resume", "r.pth", "r.pth"),
              ("--start_epoch", "2", 2), ("--num_workers", "4", 4), ("--world_size", "8", 8),
              ("--local_rank", "0", 0), ("--dist_url", "env://", "env://")]
MAE_FLAGS = {
    "main_pretrain_mae": MAE_COMMON + [("--mask_ratio", "0.6", 0.6)],
    "main_finetune": MAE_COMMON + [("--drop_path", "0.2", 0.2), ("--clip_grad", "5.0", 5.0),
                                   ("--layer_decay", "0.65", 0.65), ("--color_jitter", "0.4", 0.4),
                                   ("--aa", "v0", "v0"), ("--smoothing", "0.2", 0.2), ("--reprob", "0.1", 0.1),
                                   ("--remode", "const", "const"), ("--recount", "2", 2), ("--mixup", "0.5", 0.5),
                                   ("--cutmix", "0.5", 0.5), ("--mixup_prob", "0.5", 0.5),
                                   ("--mixup_switch_prob", "0.3", 0.3), ("--mixup_mode", "pair", "pair"),
                                   ("--finetune", "f.pth", "f.pth"), ("--nb_classes", "10", 10)],
}


@pytest.mark.parametrize("script", [*DINO_FLAGS, *MAE_FLAGS])
def test_original_flags_parse_with_their_meaning(script, clean_env):
    flags = {**DINO_FLAGS, **MAE_FLAGS}[script]
    args = parse(script, [item for flag, value, _ in flags for item in (flag, value)])
    for flag, _, expected in flags:
        assert getattr(args, flag[2:]) == expected, flag


def test_original_defaults_of_the_compat_flags(clean_env):
    for script in DINO_FLAGS:
        args = parse(script, [])
        assert (args.dist_url, args.local_rank) == ("env://", 0)
    assert parse("main_dino", []).use_fp16 is None and parse("main_dino", []).precision == "auto"
    assert parse("eval_knn", []).use_cuda is True
    for script in MAE_FLAGS:
        args = parse(script, [])
        assert (args.dist_url, args.local_rank, args.world_size, args.dist_on_itp) == ("env://", -1, 1, False)
        assert (args.pin_mem, args.resume, args.start_epoch, args.model) == (True, "", 0, None)
    args = parse("main_finetune", ["--no_pin_mem", "--dist_eval", "--resplit", "--cls_token"])
    assert (args.pin_mem, args.dist_eval, args.resplit, args.global_pool) == (False, True, True, False)
    assert parse("main_finetune", ["--global_pool"]).global_pool is True
    assert parse("main_pretrain_mae", ["--norm_pix_loss"]).norm_pix_loss is True


def test_use_fp16_maps_onto_precision(clean_env):
    assert parse("main_dino", ["--use_fp16", "false"]).precision == "fp32"
    assert parse("main_dino", ["--use_fp16", "false", "--precision", "bf16"]).precision == "fp32"
    assert parse("main_dino", ["--use_fp16", "true", "--device", "cuda"]).precision == "fp16"
    assert parse("main_dino", ["--use_fp16", "true", "--device", "cpu"]).precision == "auto"
    expected = "fp16" if torch.cuda.is_available() else "auto"
    assert parse("main_dino", ["--use_fp16", "true"]).precision == expected
    assert parse("main_dino", ["--precision", "bf16"]).precision == "bf16"


@pytest.mark.parametrize("script", [*DINO_FLAGS, *MAE_FLAGS])
def test_legacy_launcher_local_rank(script, clean_env):
    # What python -m torch.distributed.launch gives a worker: RANK, WORLD_SIZE, MASTER_* and --local-rank=N
    # (older versions without LOCAL_RANK in the environment).
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        clean_env.setenv(name, value)
    args = parse(script, ["--local-rank=0"])
    assert args.local_rank == 0 and os.environ["LOCAL_RANK"] == "0"
    assert parse(script, ["--local_rank=1"]).local_rank == 1
    clean_env.setenv("LOCAL_RANK", "2")  # a launcher that exports LOCAL_RANK is believed
    assert parse(script, ["--local-rank=3"]).local_rank == 3 and os.environ["LOCAL_RANK"] == "2"


def test_local_rank_alone_changes_no_environment(clean_env):
    parse("main_dino", ["--local-rank=0"])
    assert "LOCAL_RANK" not in os.environ  # a plain process: nothing to tell core.distributed


def test_dist_url_and_dist_on_itp(clean_env, capsys):
    parse("main_dino", ["--dist_url", "tcp://10.0.0.5:23456"])
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.5", "23456")
    assert "tcp://HOST:PORT" in cli_error("main_dino", ["--dist_url", "tcp://nohost"], capsys)
    assert "not supported" in cli_error("eval_knn", ["--dist_url", "file:///tmp/x"], capsys)
    parse("main_finetune", ["--dist_on_itp"])  # off ITP (no OpenMPI variables): nothing changes
    assert "RANK" not in os.environ
    for name, value in (("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"),
                        ("OMPI_COMM_WORLD_LOCAL_RANK", "1")):
        clean_env.setenv(name, value)
    parse("main_pretrain_mae", ["--dist_on_itp"])
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")


def test_legacy_launcher_runs_main_dino_with_use_fp16_false(tmp_path):
    """The issue's command: python -m torch.distributed.launch --nproc_per_node=1 main_dino.py --use_fp16 false."""
    data = make_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1", f"--master_port={port}",
           "main_dino.py", "--use_fp16", "false", *DINO_TINY, "--data_path", str(data), "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["use_fp16"] is False and ckpt["args"]["precision"] == "fp32"
    assert ckpt["args"]["local_rank"] == 0
    assert "fp16_scaler" not in ckpt  # fp32: no loss scaling
    assert np.isfinite(json.loads((out / "log.txt").read_text())["train_loss"])


def test_use_cuda_true_without_a_gpu_runs_on_cpu(tmp_path):
    data = tmp_path / "data"
    make_images(data / "train", 8, size=32)
    make_images(data / "val", 4, size=32, seed=1)
    args = parse("eval_knn", ["--arch", "vit_tiny", "--patch_size", "16", "--resize", "32", "--crop", "32",
                              "--nb_knn", "1", "3", "--num_workers", "0", "--device", "cpu", "--use_cuda", "true",
                              "--data_path", str(data)])
    results = eval_knn.main(args)
    assert set(results) == {1, 3} and all(0 <= top1 <= 100 for top1, _ in results.values())


def test_model_names_map_onto_sizes(clean_env):
    args = parse("main_pretrain_mae", ["--model", "mae_vit_base_patch16"])
    assert (args.arch, args.patch_size, args.embed_dim, args.depth, args.num_heads) == ("vit_base", 16, None, None,
                                                                                        None)
    assert (args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads) == (512, 8, 16)
    # A model name sets the whole size: the demo config's small overrides do not leak into a ViT-L.
    args = parse("main_pretrain_mae", ["--config", "demo", "--model", "mae_vit_large_patch16"])
    assert (args.arch, args.patch_size, args.depth, args.decoder_depth) == ("vit_large", 16, None, 8)
    args = parse("main_finetune", ["--model", "vit_large_patch16"])
    assert (args.arch, args.patch_size) == ("vit_large", 16)
    args = parse("main_finetune", ["--config", "demo", "--model", "vit_base_patch16"])
    assert (args.arch, args.patch_size, args.depth) == ("vit_base", 16, None)


@pytest.mark.parametrize("script,name", [("main_pretrain_mae", "mae_vit_huge_patch14"),
                                         ("main_finetune", "vit_huge_patch14")])
def test_vit_huge_has_the_published_shapes(script, name, clean_env):
    """ViT-H/14 as MAE's models_vit builds it (1280 wide, 32 blocks, 16 heads), against timm's vit_huge_patch14_224."""
    args = parse(script, ["--model", name])
    embed_dim, depth, num_heads = arch_sizes(args.arch, args.embed_dim, args.depth, args.num_heads)
    assert (embed_dim, depth, num_heads, args.patch_size) == (1280, 32, 16, 14)
    with torch.device("meta"):
        ours = VisionTransformer(img_size=224, patch_size=args.patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads)
        ref = timm.create_model("vit_huge_patch14_224", pretrained=False, num_classes=0)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    for k, v in ref.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")):
            assert shapes[k] == v.shape, k


def test_unknown_model_is_one_line_error(capsys, clean_env):
    err = cli_error("main_pretrain_mae", ["--model", "mae_vit_gigantic_patch14"], capsys)
    assert "mae_vit_base_patch16" in err and "mae_vit_huge_patch14" in err
    err = cli_error("main_finetune", ["--model", "mae_vit_base_patch16"], capsys)  # a pretraining name
    assert "vit_base_patch16, vit_large_patch16, vit_huge_patch14" in err


def tiny_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_resume_run_reads_resume_as_mae_load_model(tmp_path):
    model, optimizer = tiny_state()
    full = tmp_path / "full.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 6}, full)
    weights_only = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "epoch": 9}, weights_only)  # no optimizer: the weights only

    fresh, fresh_opt = torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    path, run = resume_run(tmp_path / "out", str(full), {"epoch": -1}, model=fresh, optimizer=fresh_opt)
    assert path == full and run == {"epoch": 6}
    assert torch.equal(fresh.weight, model.weight) and fresh_opt.state_dict()["state"]

    fresh, fresh_opt = torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    path, run = resume_run(tmp_path / "out", str(weights_only), {"epoch": 3}, model=fresh, optimizer=fresh_opt)
    assert path == weights_only and run == {"epoch": 3}  # --start_epoch 4 stays
    assert torch.equal(fresh.weight, model.weight) and not fresh_opt.state_dict()["state"]

    assert resume_run(tmp_path / "out", "", {"epoch": -1}, model=fresh) == (None, {"epoch": -1})
    with pytest.raises(Exception, match="does not exist"):
        resume_run(tmp_path / "out", str(tmp_path / "missing.pth"), {"epoch": -1}, model=fresh)


def test_own_checkpoint_wins_over_resume(tmp_path):
    model, optimizer = tiny_state()
    own = tmp_path / "out" / "checkpoint.pth"
    own.parent.mkdir()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4}, own)
    other = tmp_path / "other.pth"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}, other)
    fresh = torch.nn.Linear(3, 2)
    path, run = resume_run(tmp_path / "out", str(other), {"epoch": -1}, model=fresh)
    assert path == own and run == {"epoch": 4} and torch.equal(fresh.weight, model.weight)


def run_mae(argv):
    return main_pretrain_mae.main(parse("main_pretrain_mae", argv))


def test_mae_resume_from_another_folder_is_exact(tmp_path):
    data = make_images(tmp_path / "data", 8)
    run_mae(MAE_TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "once")])
    resumed = tmp_path / "resumed"
    run_mae(MAE_TINY + ["--data_path", str(data), "--output_dir", str(resumed),
                        "--resume", str(tmp_path / "once" / "checkpoint-0.pth")])
    once = torch.load(tmp_path / "once" / "checkpoint.pth", weights_only=True)
    again = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert once["epoch"] == again["epoch"] == 1
    for k in once["model"]:
        assert torch.equal(once["model"][k], again["model"][k]), k
    lines = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1]
    assert lines[0] == json.loads((tmp_path / "once" / "log.txt").read_text().splitlines()[1])


def test_mae_start_epoch_starts_the_schedule_there(tmp_path):
    data = make_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    run_mae(MAE_TINY + ["--data_path", str(data), "--output_dir", str(out), "--start_epoch", "1"])
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1]
    # 8 images in batches of 4: 2 steps per epoch, 1 warm-up epoch, 2 epochs; the last step of epoch 1 (step 3)
    # is half-way down MAE's half-cycle cosine: lr = blr x 4 / 256 x (1 + cos(pi x 1 / 2)) / 2.
    lr = 1e-2 * 4 / 256
    assert lines[0]["train_lr"] == pytest.approx(lr * (1 + np.cos(np.pi * 0.5)) / 2)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
