"""The C++ operators of ema/ and remap/ against the PyTorch code they replace, and the fallback when they are absent.

The libraries are built once (make reuses an existing build; CPU kernels only here, to keep the test fast) and the
whole module skips, with the reason, where there is no C++ compiler or make.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import check_alignment
from core import custom_ops
from core.dino import ema_update
from core.mae import build_mae

REPO = custom_ops.REPO


def run_make(folder, *overrides):
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO / folder), f"PYTHON={sys.executable}",
                           *overrides], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def built():
    """Both libraries built (or already there) and loaded."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which("make") is None or shutil.which(compiler) is None:
        pytest.skip(f"cannot build the C++ ops here: needs make and a C++ compiler ({compiler})")
    for folder in ("ema", "remap"):
        if not custom_ops.library_path(folder).is_file():
            result = run_make(folder, "WITH_CUDA=0")
            assert result.returncode == 0, result.stdout + result.stderr
    assert custom_ops.has_fused("ema", "ema_update_", "cpu")
    assert custom_ops.has_fused("remap", "gather_tokens", "cpu")


def foreach_ema(t, s, m):
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1 - m)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_ema_bit_exact_with_foreach(built, threads):
    """Sizes with vector tails, fp64, and tensors the fused loop hands back to foreach (bf16, non-contiguous)."""
    torch.manual_seed(0)
    shapes = [(7,), (1003,), (384, 1537), (2, 3, 5)]
    teacher = [torch.randn(s) for s in shapes]
    teacher += [torch.randn(17, dtype=torch.float64), torch.randn(33).bfloat16(), torch.randn(6, 40).t()]
    student = [torch.randn_like(t) for t in teacher]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (0.996, 0.9995, 0.3, 1.0):
            expected = [t.clone() for t in teacher]
            foreach_ema(expected, student, m)
            fused = [t.clone() for t in teacher]
            torch.ops.dinossl.ema_update_(fused, student, m)
            for e, f in zip(expected, fused):
                assert e.dtype == f.dtype and torch.equal(e, f)
    finally:
        torch.set_num_threads(previous)
    # The comparison tells roundings apart: the original loop's, with (1 - m) * s rounded first, differs.
    original = teacher[2].clone().mul_(0.996).add_((1 - 0.996) * student[2])
    assert not torch.equal(original, teacher[2].clone().mul_(0.996).add_(student[2], alpha=1 - 0.996))


def ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("dinossl::")}


def test_ema_update_takes_the_fused_path_with_the_same_result(built):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.LayerNorm(50))
    teacher = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.LayerNorm(50))
    copies = []
    for enabled in (True, False):
        t = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.LayerNorm(50))
        t.load_state_dict(teacher.state_dict())
        with custom_ops.use_fused(enabled):
            for _ in range(2):
                ema_update(t, student, 0.99)
            assert ops_called(lambda: ema_update(t, student, 0.99)) == ({"dinossl::ema_update_"} if enabled else set())
        copies.append(t)
    for a, b in zip(copies[0].parameters(), copies[1].parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(copies[0][0].weight, teacher[0].weight)


def gather_reference(x, index):
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remap_forward_and_backward_equal_torch_gather(built, dtype):
    """MAE's two uses (visible tokens by ids_keep; un-shuffle by ids_restore) and an index with repeats."""
    torch.manual_seed(0)
    B, L, D = 3, 16, 8
    ids_shuffle = torch.rand(B, L).argsort(dim=1)
    indices = [ids_shuffle[:, :4], ids_shuffle.argsort(dim=1), torch.randint(0, L, (B, 20))]
    for index in indices:
        x = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(B, index.shape[1], D, dtype=dtype)
        out = torch.ops.dinossl.gather_tokens(x, index)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        ref = gather_reference(x, index)
        (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
        assert torch.equal(custom_ops.gather_tokens(x, index), ref)


def test_remap_gradients_by_finite_differences(built):
    """The registered autograd, first and second order, against numerical derivatives (not against torch)."""
    index = torch.tensor([[2, 0, 2], [1, 3, 0]])
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.dinossl.gather_tokens(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.dinossl.gather_tokens(t, index), (x,))
    src = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.dinossl.scatter_add_tokens(t, index, 4), (src,))


def test_remap_rejects_bad_index(built):
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="out of range for 4 tokens"):
        torch.ops.dinossl.gather_tokens(x, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.dinossl.gather_tokens(x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))


def test_onehot_gather_equals_torch_gather():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 6, requires_grad=True)
    index = torch.rand(2, 10).argsort(dim=1)[:, :3]
    grad_out = torch.randn(2, 3, 6)
    out = custom_ops.gather_tokens_onehot(x, index)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    ref = gather_reference(x, index)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("model", ["dino", "mae"])
def test_training_steps_with_fused_ops_equal_fallbacks(built, model):
    """Two full steps (MAE: masking and un-shuffle; DINO: teacher EMA) with the fused ops, against the fallbacks."""
    args = check_alignment.get_args_parser().parse_args(
        ["--model", model, "--precision", "fp32", "--fused_ops", "on", "--steps", "2", "--out_dim", "256",
         "--batch_size", "2"])
    result = check_alignment.main(args)
    assert all(ref == cand for ref, cand in result["losses"])
    assert all(d == (0.0, 0.0) for d in result["grads"].values()) and result["weights"] == 0.0


def test_mae_forward_uses_the_fused_gather_with_the_same_result(built):
    torch.manual_seed(0)
    model = build_mae("vit_tiny", 8, 32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    results = []
    for enabled in (True, False):
        model.zero_grad()
        with custom_ops.use_fused(enabled):
            assert ops_called(lambda: model(imgs, 0.75, noise)) == ({"dinossl::gather_tokens"} if enabled else set())
            loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        results.append((loss.detach(), model.patch_embed.proj.weight.grad.clone(), model.mask_token.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("override, message", [
    ("CXX=false", "ema: compiling ema.cpp with false failed"),
    ("CXX=/nonexistent/g++", "ema: no C++ compiler '/nonexistent/g++'"),
    ("PYTHON=/bin/false", "cannot import torch"),
])
def test_failed_build_says_why_and_leaves_no_library(tmp_path, override, message):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = run_make("ema", f"BUILD={tmp_path}", "WITH_CUDA=0", override)
    assert result.returncode != 0
    assert message in result.stderr and "the PyTorch fallback stays in use" in result.stderr
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


FALLBACK_SCRIPT = """
import sys
from pathlib import Path
import torch
from core import custom_ops
from core.dino import ema_update
from core.mae import random_masking
custom_ops.REPO = Path(sys.argv[1])
bad = custom_ops.library_path("remap")
bad.parent.mkdir(parents=True)
bad.write_text("not a shared library")
torch.manual_seed(0)
t, s = torch.nn.Linear(5, 7), torch.nn.Linear(5, 7)
expected = [p.detach().clone() for p in t.parameters()]
torch._foreach_mul_(expected, 0.9)
torch._foreach_add_(expected, [p.detach() for p in s.parameters()], alpha=1 - 0.9)
ema_update(t, s, 0.9)
x, noise = torch.randn(2, 8, 3), torch.rand(2, 8)
kept = random_masking(x, 0.5, noise)[0]
ids_keep = noise.argsort(dim=1)[:, :4]
print("EMA", all(torch.equal(a, b) for a, b in zip(t.parameters(), expected)),
      "GATHER", torch.equal(kept, x.gather(1, ids_keep[..., None].expand(-1, -1, 3))))
"""


def test_missing_or_broken_library_falls_back_with_one_line(tmp_path):
    """In a fresh process whose ema/ is not built and whose remap/ library is corrupt: the imports work, both ops
    fall back with the same numbers, and each says so once with the command that builds it."""
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "EMA True GATHER True" in result.stdout
    assert result.stdout.count("fused ema op not built") == 1
    assert f"make -C {tmp_path / 'ema'} PYTHON=" in result.stdout
    assert result.stdout.count("fused remap op at") == 1 and "does not load" in result.stdout
