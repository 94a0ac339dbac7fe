"""Launching at scale without a cluster: the pod scripts' commands, the submitit job and its requeue, SLURM's
variables as ranks, and the permissions of what a run writes."""
import os
import pickle
import shlex
import stat
import subprocess

import pytest
import torch

import main_dino
import main_pretrain_mae
from core.checkpoint import save_checkpoint
from core.config import parse_args
from core.distributed import first_host, world_from_env
from core.log import append_json_line
from tests.conftest import REPO

submitit = pytest.importorskip("submitit", reason="submitit (requirements-dev.txt) is not installed")
import run_with_submitit  # noqa: E402

SCRIPTS = {  # script: (entry point, config, accelerators, IPUs per replica or 0)
    "vit_small_pod16.sh": ("main_dino.py", "vit_small_pod16", 16, 4),
    "vit_base_pod16.sh": ("main_dino.py", "vit_base_pod16", 16, 8),
    "vit_base_pod64.sh": ("main_dino.py", "vit_base_pod64", 64, 8),
    "vit_base_pod256.sh": ("main_dino.py", "vit_base_pod256", 256, 8),
    "mae_base_pod16.sh": ("main_pretrain_mae.py", "mae_base_pod16", 16, 0),
    "mae_base_pod64.sh": ("main_pretrain_mae.py", "mae_base_pod64", 64, 0),
}


def pod(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("DEVICE", "LAUNCHER", "NODE_RANK", "DRY_RUN")}
    full_env.update(env)
    return subprocess.run(["bash", str(REPO / "training_scripts" / script), *args], capture_output=True, text=True,
                          env=full_env)


def option(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_pod_script_without_hosts_is_an_error(script):
    out = pod(script, "--data_path", "/data", DRY_RUN="1")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and "--hosts" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_pod_script_runs_torchrun_over_the_pod(script):
    entry, config, accelerators, _ = SCRIPTS[script]
    hosts = [f"node{i}" for i in range(accelerators // 8)]
    out = pod(script, "--hosts", ",".join(hosts), "--data_path", "/data/my images", "--output_dir=runs/x",
              DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[0] == "torchrun"
    assert int(option(cmd, "--nnodes")) * int(option(cmd, "--nproc_per_node")) == accelerators
    assert option(cmd, "--rdzv_backend") == "c10d" and option(cmd, "--rdzv_endpoint") == "node0:29500"
    i = cmd.index(str(REPO / entry))
    assert cmd[i + 1:] == ["--config", config, "--data_path", "/data/my images", "--output_dir=runs/x"]
    # the named configuration exists in the entry point's section
    module = main_dino if entry == "main_dino.py" else main_pretrain_mae
    parse_args(module.get_args_parser(), entry[:-3], ["--config", config])


def test_pod_script_checks_the_number_of_hosts():
    out = pod("vit_base_pod64.sh", "--hosts", "a,b", DRY_RUN="1")
    assert out.returncode == 2
    assert out.stderr == ("error: vit_base_pod64.sh runs 64 processes as 8 nodes x 8, but --hosts lists 2: give 8 "
                          "hosts (or set PROCS_PER_NODE)\n")
    out = pod("vit_base_pod64.sh", "--hosts", "a,b,c,d", "--rdzv", "a:1234", DRY_RUN="1", PROCS_PER_NODE="16")
    cmd = shlex.split(out.stdout)
    assert (option(cmd, "--nnodes"), option(cmd, "--nproc_per_node"), option(cmd, "--rdzv_endpoint")) == \
        ("4", "16", "a:1234")


def test_pod_script_on_hpus_with_the_legacy_launcher():
    out = pod("vit_small_pod16.sh", "--hosts", "gaudi0,gaudi1", DRY_RUN="1", DEVICE="hpu", LAUNCHER="launch",
              NODE_RANK="1", PYTHON="python3")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:3] == ["python3", "-m", "torch.distributed.launch"]
    assert [option(cmd, k) for k in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr",
                                     "--master_port")] == ["2", "1", "8", "gaudi0", "29500"]
    assert cmd[-4:] == ["--config", "vit_small_pod16", "--device", "hpu"]
    out = pod("vit_small_pod16.sh", "--hosts", "not-this-host-0,not-this-host-1", DRY_RUN="1", DEVICE="hpu",
              LAUNCHER="launch")
    assert out.returncode == 2 and out.stderr.startswith("error: this host") and "NODE_RANK" in out.stderr


@pytest.mark.parametrize("script", [s for s, v in SCRIPTS.items() if v[3]])
def test_pod_script_runs_poprun_on_ipus(script):
    entry, config, accelerators, ipus_per_replica = SCRIPTS[script]
    out = pod(script, "--hosts", "ipuhost", "--vipu_partition", "p16", DRY_RUN="1", DEVICE="ipu")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[0] == "poprun" and option(cmd, "--vipu-partition") == "p16"
    replicas, per_replica = int(option(cmd, "--num-replicas")), int(option(cmd, "--ipus-per-replica"))
    assert replicas * per_replica == accelerators and per_replica == ipus_per_replica
    assert cmd[cmd.index(str(REPO / entry)) + 1:] == ["--config", config + "_ipu", "--replication_factor",
                                                      str(replicas)]
    args = parse_args(main_dino.get_args_parser(), "main_dino", ["--config", config + "_ipu"])
    assert args.device == "ipu" and args.replication_factor == replicas and len(args.ipu_pipeline) == per_replica


def test_mae_pod_script_on_ipus_is_an_error():
    out = pod("mae_base_pod16.sh", "--hosts", "ipuhost", DRY_RUN="1", DEVICE="ipu")
    assert out.returncode == 2 and out.stderr.startswith("error: main_pretrain_mae.py has no IPU training step")


# ---- SLURM ----

def fake_slurm(tmp_path, monkeypatch):
    """srun and sbatch stand-ins, so submitit's SLURM executor writes its batch file as on a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_submitit_job_asks_for_the_pod(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    script, args = run_with_submitit.parse(["--nodes", "2", "--ngpus", "8", "--timeout", "600", "--partition", "gpu",
                                            "--use_volta32", "--comment", "deadline", "--config", "vit_base_pod16",
                                            "--output_dir", str(tmp_path / "run")])
    assert script == "main_dino" and args.arch == "vit_base" and args.clip_grad == 0.3
    executor = run_with_submitit.build_executor(args, tmp_path / "run" / "submitit", cluster="slurm")
    job = executor.submit(run_with_submitit.Trainer(script, args))
    assert job.job_id == "4242"
    lines = set(job.paths.submission_file.read_text().splitlines())
    for expected in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=320GB",
                     "--time=600", "--partition=gpu", "--constraint=volta32gb", "--comment=deadline",
                     "--signal=USR2@120", "--job-name=dino"):
        assert f"#SBATCH {expected}" in lines, expected
    assert executor._executor.max_num_timeout == 30


def test_submitit_parses_mae_with_its_config():
    script, args = run_with_submitit.parse(["--script", "main_pretrain_mae", "--nodes", "8", "--config",
                                            "mae_base_pod64"])
    assert script == "main_pretrain_mae" and args.nodes == 8 and (args.batch_size, args.accum_iter) == (64, 1)
    params = run_with_submitit.executor_parameters(args)
    assert params["nodes"] * params["tasks_per_node"] == 64 and "slurm_constraint" not in params


def test_requeue_resubmits_the_same_job(tmp_path):
    _, args = run_with_submitit.parse(["--config", "vit_small_pod16", "--output_dir", str(tmp_path / "%j")])
    trainer = run_with_submitit.Trainer("main_dino", args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, run_with_submitit.Trainer) and again is not trainer
    assert again.script == "main_dino" and vars(again.args) == vars(args)
    delayed.dump(tmp_path / "requeue.pkl")  # what submitit writes for the requeued job
    loaded = submitit.helpers.DelayedSubmission.load(tmp_path / "requeue.pkl")
    assert vars(loaded.function.args) == vars(args)


def test_job_runs_the_script_with_the_job_id(tmp_path, monkeypatch):
    """The debug executor runs the job in this process: the script gets its args, %j becomes the job id."""
    (tmp_path / "fake_train.py").write_text("def main(args):\n    return args.output_dir\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, args = run_with_submitit.parse(["--config", "demo", "--output_dir", str(tmp_path / "%j")])
    executor = run_with_submitit.build_executor(args, tmp_path / "submitit", cluster="debug")
    job = executor.submit(run_with_submitit.Trainer("fake_train", args))
    assert job.result() == str(tmp_path / str(job.job_id))


def clear_launcher_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)


def test_slurm_variables_map_to_ranks(tmp_path, monkeypatch):
    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the node list is read directly
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],cpu1")
    assert world_from_env() == (13, 16, 5)
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == "29500"
    monkeypatch.setenv("RANK", "2")  # torchrun's variables win over SLURM's (torchrun started inside a job)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert world_from_env() == (2, 4, 2)


def test_one_slurm_task_is_a_single_process(monkeypatch):
    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert world_from_env() == (0, 1, 0) and "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a1,a2", "a1"), ("gpu[03-05,9],cpu1", "gpu03"),
                                            ("n[7]", "n7"), ("rack-2-[10,12]", "rack-2-10")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


# ---- permissions ----

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_and_logs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "checkpoint.pth")
        torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")  # the reference: what torch.save gives
        append_json_line(tmp_path / "log.txt", {"epoch": 0})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"checkpoint.pth": mode, "plain.pth": mode, "log.txt": mode}
    assert torch.equal(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["w"], torch.ones(2))


def test_failed_save_leaves_no_temporary_file(tmp_path):
    def broken_write(obj, f):
        f.write(b"half")
        raise pickle.PicklingError("cannot pickle")

    with pytest.raises(pickle.PicklingError):
        save_checkpoint({"w": 1}, tmp_path / "checkpoint.pth", write=broken_write)
    assert list(tmp_path.iterdir()) == []
