"""HPU and IPU adapters without their vendor packages: clear errors, op-list checks, pipeline and batch arithmetic,
the IPU step's teacher EMA and loss against the GPU loop's, and the IPU pod configurations."""
import contextlib
import copy
import importlib.util
import re
import sys
from types import SimpleNamespace

import pytest
import torch

import main_dino
from core import hpu, ipu
from core.config import parse_args
from core.device import compile_for, resolve_device, step_boundary
from core.dino import DINOHead, DINOLoss, MultiCropWrapper, ema_update
from core.errors import UserError, run_cli
from core.optim import param_groups
from core.vision_transformer import SIZES, build_vit

HAS_HABANA = importlib.util.find_spec("habana_frameworks") is not None
HAS_POPTORCH = importlib.util.find_spec("poptorch") is not None


def run_main_dino(argv, capsys):
    """main_dino as its command line runs it (run_cli): (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", argv)))
    return e.value.code, capsys.readouterr().err


# ---- HPU ----

def use_shipped_op_lists(monkeypatch):
    """Set through monkeypatch, so that what resolve_device writes into the environment is undone after the test."""
    for var, path in hpu.OP_LISTS.items():
        monkeypatch.setenv(var, str(path))


@pytest.mark.skipif(HAS_HABANA, reason="habana_frameworks is installed: the missing-package error cannot show")
def test_hpu_without_package_is_a_clear_error(monkeypatch):
    use_shipped_op_lists(monkeypatch)
    with pytest.raises(UserError, match="habana_frameworks"):
        resolve_device("hpu")


def test_is_aten_op():
    for name in ("linear", "softmax", "log_softmax", "layer_norm", "scaled_dot_product_attention", "bmm"):
        assert hpu.is_aten_op(name), name
    for name in ("lienar", "softmaxx", "Linear", "aten::linear", "linear ", "", "__dict__", "_op_namespace"):
        assert not hpu.is_aten_op(name), name


def test_shipped_op_lists_are_valid_and_disjoint():
    bf16 = hpu.read_op_list(hpu.OP_LISTS["PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST"])
    fp32 = hpu.read_op_list(hpu.OP_LISTS["PT_HPU_AUTOCAST_FP32_OPS_LIST"])
    assert "linear" in bf16 and "softmax" in fp32 and "log_softmax" in fp32
    assert not set(bf16) & set(fp32)
    assert len(set(bf16)) == len(bf16) and len(set(fp32)) == len(fp32)


def test_misspelt_op_names_file_and_line(tmp_path):
    bad = tmp_path / "ops.txt"
    bad.write_text("linear\nmatmul\nlienar\nbmm\n")
    with pytest.raises(UserError) as e:
        hpu.read_op_list(bad)
    assert f"{bad}:3" in str(e.value) and "'lienar'" in str(e.value) and "\n" not in str(e.value)
    bad.write_text("linear\n\nbmm\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:2")):
        hpu.read_op_list(bad)


def test_configure_autocast_defaults_and_user_lists(tmp_path):
    env = {}
    chosen = hpu.configure_autocast(env)
    assert chosen == {k: str(v) for k, v in hpu.OP_LISTS.items()} == env
    mine = tmp_path / "mine.txt"
    mine.write_text("mm\n")
    env = {"PT_HPU_AUTOCAST_FP32_OPS_LIST": str(mine)}
    assert hpu.configure_autocast(env)["PT_HPU_AUTOCAST_FP32_OPS_LIST"] == str(mine)
    with pytest.raises(UserError, match="does not exist"):
        hpu.configure_autocast({"PT_HPU_AUTOCAST_FP32_OPS_LIST": str(tmp_path / "missing.txt")})


def test_misspelt_op_list_stops_the_cli(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "fp32.txt"
    bad.write_text("softmax\nlayer_nrom\n")
    use_shipped_op_lists(monkeypatch)
    monkeypatch.setenv("PT_HPU_AUTOCAST_FP32_OPS_LIST", str(bad))
    status, err = run_main_dino(["--device", "hpu", "--output_dir", str(tmp_path / "out")], capsys)
    assert status == 2
    assert err.strip() == (f"error: {bad}:2: 'layer_nrom' is not a torch.ops.aten operator: fix the spelling "
                                  f"(one aten op name a line, e.g. 'linear') or remove the line")


def test_cpu_needs_no_step_boundary_or_compile():
    model = torch.nn.Linear(2, 2)
    assert compile_for(torch.device("cpu"), model) is model
    assert step_boundary(torch.device("cpu")) is None


# ---- IPU: plain arithmetic ----

def test_block_ipus():
    assert ipu.block_ipus([4, 4, 4, 0], 12) == [0] * 4 + [1] * 4 + [2] * 4
    assert ipu.block_ipus([1, 2, 2, 2, 2, 2, 1, 0], 12) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert ipu.block_ipus([12], 12) == [0] * 12
    assert ipu.stage_starts([1, 2, 2, 2, 2, 2, 1, 0]) == {0: 0, 1: 1, 3: 2, 5: 3, 7: 4, 9: 5, 11: 6}
    assert ipu.stage_starts([0, 3, 3]) == {0: 1, 3: 2}
    assert ipu.head_ipus([4, 4, 4, 0]) == (2, 3)
    assert ipu.head_ipus([12]) == (0, 0)


@pytest.mark.parametrize("split,depth", [([4, 4, 3], 12), ([4, 4, 4, 1], 12), ([6, -1, 7], 12), ([], 12),
                                         ([5, 5, 5, 0], 24)])
def test_bad_split_is_one_line_with_a_valid_suggestion(split, depth):
    with pytest.raises(UserError) as e:
        ipu.block_ipus(split, depth)
    msg = str(e.value)
    assert "\n" not in msg and f"the model has {depth}" in msg
    suggestion = [int(n) for n in msg.split("--ipu_pipeline ")[-1].split()]
    assert len(suggestion) == max(len(split), 1)
    assert len(ipu.block_ipus(suggestion, depth)) == depth


def test_bad_split_stops_main_dino_with_exit_2(tmp_path, capsys):
    status, err = run_main_dino(["--device", "ipu", "--arch", "vit_small", "--ipu_pipeline", "4", "4", "3",
                                 "--output_dir", str(tmp_path)], capsys)
    assert status == 2
    assert err.startswith("error: --ipu_pipeline [4, 4, 3] places 11 blocks but the model has 12")
    assert len(err.strip().splitlines()) == 1


def test_global_batch():
    # vit_small_pod16 on IPUs: micro-batch 2, 128 accumulated, 4 replicas = the GPU recipe's 64 x 16
    assert ipu.global_batch(2, 128, 4, 1) == 1024 == 64 * 16
    assert ipu.global_batch(2, 128, 4, 8) == 1024  # device iterations run more steps per call, same batch a step
    # images a call consumes: one row of the host's inputs per micro-batch
    micro, accum, replicas, di = 3, 5, 2, 4
    rows = di * accum * replicas
    assert rows * micro == ipu.global_batch(micro, accum, replicas, di) * di
    for bad in ((0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)):
        with pytest.raises(UserError, match="must be at least 1"):
            ipu.global_batch(*bad)


def test_micro_ema_factor_equals_one_update_per_step():
    """Accumulated micro-batch updates inside the step plus the host's update at an epoch's end leave the teacher
    where the GPU loop's one update per optimizer step leaves it, at every epoch end."""
    g = torch.Generator().manual_seed(0)
    epochs, steps, accum = 3, 4, 5
    momentum = [0.9 + 0.02 * i for i in range(epochs * steps)]
    students = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(epochs * steps)]
    gpu = ipu_t = students[0].clone()  # the teacher starts as the student
    for epoch in range(epochs):
        for i in range(steps):
            it = epoch * steps + i
            before = students[it - 1] if it else students[0]  # the student during step it (set by step it - 1)
            f = ipu.micro_ema_factor(momentum, it, steps, accum)
            for _ in range(accum):
                ipu_t = f * ipu_t + (1 - f) * before
            gpu = momentum[it] * gpu + (1 - momentum[it]) * students[it]  # GPU: after step it's optimizer step
        last = (epoch + 1) * steps - 1
        ipu_t = momentum[last] * ipu_t + (1 - momentum[last]) * students[last]  # host, at the epoch's end
        assert torch.allclose(ipu_t, gpu, rtol=0, atol=1e-12), epoch
    assert ipu.micro_ema_factor(momentum, steps, steps, accum) == 1.0
    assert ipu.micro_ema_factor(momentum, 5, steps, 2) == pytest.approx(momentum[4] ** 0.5)


def test_row_ema_factors_give_each_device_iteration_its_step():
    momentum = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.98]
    # 3 device iterations x (2 accumulated x 2 replicas) rows, from the first step of the second epoch (6 steps each)
    rows = ipu.row_ema_factors(momentum, 6, 6, 2, 3, 12)
    # step 6 starts an epoch (the host applied step 5's 0.95); steps 7 and 8 apply those of steps 6 and 7
    expected = [1.0] * 4 + [0.96 ** 0.5] * 4 + [0.97 ** 0.5] * 4
    assert torch.allclose(rows, torch.tensor(expected, dtype=rows.dtype))
    assert torch.allclose(ipu.row_ema_factors(momentum, 2, 6, 1, 1, 3), torch.tensor([0.6] * 3, dtype=rows.dtype))


# ---- IPU: the compiled step's arithmetic, run eagerly on CPU ----

def tiny_dino(seed):
    torch.manual_seed(seed)
    net = MultiCropWrapper(build_vit("vit_tiny", 16, img_size=32), DINOHead(192, 64, nlayers=2, hidden_dim=32))
    return net


def test_step_loss_and_ema_match_the_gpu_loop():
    student, teacher = tiny_dino(0), tiny_dino(1)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    center = torch.randn(1, 64) * 0.1
    reference_teacher = copy.deepcopy(teacher)
    ema_update(reference_teacher, student, 0.7)
    loss_ref = DINOLoss(64, 4, 0.04, 0.04, 0, 1)
    loss_ref.center.copy_(center)
    with torch.no_grad():
        expected_teacher_out = reference_teacher(crops[:2])
        expected = loss_ref(student(crops), expected_teacher_out, 0)

    step = ipu.DinoStep(student, teacher, ncrops=4)
    rows = 3  # the host gives one row per micro-batch; the step reads the first
    with torch.no_grad():
        loss, teacher_sum = step(crops, torch.full((rows,), 0.7), center.expand(rows, -1), torch.full((rows,), 0.04))
    for a, b in zip(teacher.state_dict().values(), reference_teacher.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(teacher_sum, expected_teacher_out.sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_pipeline_places_every_teacher_parameter_once():
    step = ipu.DinoStep(tiny_dino(0), tiny_dino(1), ncrops=4)
    placed = []
    fake_poptorch = SimpleNamespace(BeginBlock=lambda module, ipu_id: placed.append((module, ipu_id)) or module)
    split = [4, 4, 4, 0]
    step.pipeline(fake_poptorch, split)
    seen = [id(p) for _, t_part, _ in step.ema_groups for p in t_part.parameters()]
    assert sorted(seen) == sorted(id(p) for p in step.teacher.parameters())
    pairs = [(id(s), id(t)) for s_part, t_part, _ in step.ema_groups
             for s, t in zip(s_part.parameters(), t_part.parameters())]
    names = dict(zip(map(id, step.student.parameters()), (n for n, _ in step.student.named_parameters())))
    tnames = dict(zip(map(id, step.teacher.parameters()), (n for n, _ in step.teacher.named_parameters())))
    assert all(names[s] == tnames[t] for s, t in pairs)
    blocks = {id(b): i for i, b in enumerate(step.teacher.backbone.blocks)}
    block_ipu = {blocks[id(m)]: ipu_id for m, ipu_id in placed if id(m) in blocks}
    assert block_ipu == {0: 0, 4: 1, 8: 2}
    assert (step.teacher.head.last_layer, 3) in placed and (step.teacher.head.mlp, 2) in placed


def test_ipu_param_groups_cover_each_parameter_once():
    student = tiny_dino(0)
    groups = ipu.param_groups(student)
    flat = [id(p) for g in groups for p in g["params"]]
    assert sorted(flat) == sorted(id(p) for p in student.parameters() if p.requires_grad)
    decayed = {id(p) for g in param_groups(student) if g["apply_wd"] for p in g["params"]}
    assert decayed == {id(p) for g in groups if g["apply_wd"] for p in g["params"]}
    last = {id(p) for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad}
    assert last == {id(p) for g in groups if g["last_layer"] for p in g["params"]}


@pytest.mark.skipif(HAS_POPTORCH, reason="poptorch is installed: the missing-package error cannot show")
def test_ipu_without_package_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="poptorch"):
        resolve_device("ipu")
    args = parse_args(main_dino.get_args_parser(), "main_dino",
                      ["--device", "ipu", "--arch", "vit_tiny", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="'poptorch' package"):
        main_dino.main(args)


@pytest.mark.parametrize("name,accelerators", [("vit_small_pod16", 16), ("vit_base_pod16", 16),
                                               ("vit_base_pod64", 64), ("vit_base_pod256", 256)])
def test_ipu_pod_configs_match_the_gpu_recipe(name, accelerators):
    gpu = parse_args(main_dino.get_args_parser(), "main_dino", ["--config", name])
    ipu_args = parse_args(main_dino.get_args_parser(), "main_dino", ["--config", name + "_ipu"])
    depth = SIZES[ipu_args.arch][1]
    assert len(ipu.block_ipus(ipu_args.ipu_pipeline, depth)) == depth
    assert len(ipu_args.ipu_pipeline) * ipu_args.replication_factor == accelerators
    assert ipu.global_batch(ipu_args.batch_size_per_gpu, ipu_args.accum_iter, ipu_args.replication_factor, 1) == \
        gpu.batch_size_per_gpu * gpu.accum_iter * accelerators == 1024
    same = ("arch", "patch_size", "out_dim", "lr", "min_lr", "epochs", "warmup_epochs", "teacher_temp",
            "momentum_teacher", "local_crops_number", "weight_decay", "weight_decay_end", "norm_last_layer")
    assert {k: getattr(gpu, k) for k in same} == {k: getattr(ipu_args, k) for k in same}


class EagerPoptorch:
    """A poptorch stand-in that runs the compiled step eagerly: inputs are cut into one micro-batch per row, as the
    IPU cuts them; gradients accumulate over accum_iter micro-batches, then the optimizer steps."""

    class Options:
        def __init__(self):
            self.Training, self.Precision = SimpleNamespace(), SimpleNamespace()
            self.Training.gradientAccumulation = lambda n: setattr(self, "accum", n)
            self.Training.accumulationAndReplicationReductionType = lambda t: None
            self.Precision.setPartialsType = lambda t: None
            self.replicas = self.iterations = 1

        def replicationFactor(self, n):
            self.replicas = n

        def deviceIterations(self, n):
            self.iterations = n

        def __getattr__(self, name):  # randomSeed, outputMode, enableExecutableCaching, setExecutionStrategy
            return lambda *args: None

    ReductionType = SimpleNamespace(Mean="mean")
    OutputMode = SimpleNamespace(All="all")
    AutoStage = SimpleNamespace(SameAsIpu="same")
    optim = SimpleNamespace(AdamW=lambda groups, lr, loss_scaling: torch.optim.AdamW(groups, lr=lr))

    @staticmethod
    def PipelinedExecution(stage):
        return stage

    @staticmethod
    def BeginBlock(module, ipu_id):
        return module

    @staticmethod
    def Block(ipu_id):
        return contextlib.nullcontext()

    @staticmethod
    def identity_loss(loss, reduction):
        return loss

    @staticmethod
    def DataLoader(opts, dataset, batch_size, **kwargs):
        combined = batch_size * opts.accum * opts.replicas * opts.iterations
        return torch.utils.data.DataLoader(dataset, combined, shuffle=True, drop_last=True)

    class trainingModel:
        def __init__(self, model, opts, optimizer):
            self.model, self.opts, self.optimizer = model, opts, optimizer
            self.setOptimizer = self.copyWeightsToHost = self.copyWeightsToDevice = self.detachFromDevice = \
                lambda *args: None

        def __call__(self, crops, ema_factor, center, teacher_temp):
            rows, outputs = len(ema_factor), []
            micro = len(crops[0]) // rows
            for r in range(rows):
                part = [c[r * micro:(r + 1) * micro] for c in crops]
                loss, teacher_sum = self.model(part, ema_factor[r:r + 1], center[r:r + 1], teacher_temp[r:r + 1])
                (loss / self.opts.accum).backward()
                if (r + 1) % self.opts.accum == 0:
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                outputs.append((loss.detach(), teacher_sum.detach()))
            return torch.stack([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def test_ipu_loop_runs_and_resumes_with_a_poptorch_stand_in(tmp_path, monkeypatch):
    from tests.test_main_dino import make_images

    monkeypatch.setitem(sys.modules, "poptorch", EagerPoptorch)
    data = make_images(tmp_path / "data", 10)
    argv = ["--device", "ipu", "--arch", "vit_tiny", "--out_dim", "64", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "2", "--accum_iter", "2",
            "--replication_factor", "2", "--epochs", "1", "--warmup_epochs", "1", "--num_workers", "0",
            "--ipu_pipeline", "4", "4", "4", "0", "--precision", "fp32", "--clip_grad", "0", "--saveckp_freq", "1",
            "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", argv))
    first = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(first) and first["epoch"] == 1
    assert set(first["student"]) == {f"module.{k}" for k in first["teacher"]}
    assert not torch.equal(first["dino_loss"]["center"], torch.zeros(1, 64))
    argv[argv.index("--epochs") + 1] = "2"
    main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", argv))
    second = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert second["epoch"] == 2 and (tmp_path / "out" / "checkpoint0001.pth").is_file()
    assert len((tmp_path / "out" / "log.txt").read_text().splitlines()) == 2
