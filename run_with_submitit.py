"""Submit DINO or MAE pretraining to SLURM with submitit, one task per GPU, requeued on preemption or time-out.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --config vit_base_pod16 \\
        --data_path /data/imagenet/train --output_dir /checkpoint/$USER/dino_b16
    python run_with_submitit.py --script main_pretrain_mae --nodes 8 --config mae_base_pod64 ...

Every flag of the training script is accepted as well (its --help lists them). When SLURM stops the job (time limit
or preemption), submitit calls Trainer.checkpoint, which requeues the same command; the training script then resumes
from checkpoint.pth in --output_dir, as any restarted run does. `%j` in --output_dir becomes the job id.
"""
import argparse
import importlib
import sys
from pathlib import Path

from core.config import parse_args
from core.errors import UserError, run_cli

SCRIPTS = ("main_dino", "main_pretrain_mae")


def add_slurm_args(parser):
    g = parser.add_argument_group("SLURM (as facebookresearch/dino's run_with_submitit.py)")
    g.add_argument("--script", default="main_dino", choices=SCRIPTS, help="Training script to run.")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs per node (one task each).")
    g.add_argument("--nodes", default=2, type=int, help="Number of nodes.")
    g.add_argument("--timeout", default=2800, type=int,
                   help="Job time limit in minutes; the job is requeued and resumes when it runs out.")
    g.add_argument("--partition", default="learnfair", type=str, help="SLURM partition to submit to.")
    g.add_argument("--use_volta32", action="store_true", help="Ask for 32 GB V100s (constraint volta32gb).")
    g.add_argument("--comment", default="", type=str, help="Comment passed to the scheduler.")
    g.add_argument("--max_requeues", default=30, type=int,
                   help="Requeues after time-outs before submitit gives up (preemptions do not count).")
    return parser


def script_of(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--script", default="main_dino", choices=SCRIPTS)
    return pre.parse_known_args(argv)[0].script


def executor_parameters(args):
    """The resources of the original launcher: 10 CPUs and 40 GB per GPU, SIGUSR1 two minutes before the limit."""
    params = {
        "mem_gb": 40 * args.ngpus,
        "gpus_per_node": args.ngpus,
        "tasks_per_node": args.ngpus,
        "cpus_per_task": 10,
        "nodes": args.nodes,
        "timeout_min": args.timeout,
        "name": args.script.replace("main_", ""),
        "slurm_partition": args.partition,
        "slurm_signal_delay_s": 120,
    }
    if args.use_volta32:
        params["slurm_constraint"] = "volta32gb"
    if args.comment:
        params["slurm_comment"] = args.comment
    return params


class Trainer:
    """The job: run the training script in each task; on SLURM's signal, requeue a fresh copy of itself."""

    def __init__(self, script, args):
        self.script, self.args = script, args

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        self.args.output_dir = str(self.args.output_dir).replace("%j", str(env.job_id))
        # core.distributed reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which srun sets for every task.
        return run_cli(lambda: importlib.import_module(self.script).main(self.args))

    def checkpoint(self, *args, **kwargs):
        """Called by submitit at time-out or preemption: the same job again, which resumes from checkpoint.pth."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.script, self.args))


def build_executor(args, folder, cluster=None):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**executor_parameters(args))
    return executor


def parse(argv=None):
    """(script name, its arguments with the SLURM ones), --config applied from the script's section."""
    script = script_of(argv if argv is not None else sys.argv[1:])
    parser = add_slurm_args(importlib.import_module(script).get_args_parser())
    parser.description = __doc__
    return script, parse_args(parser, script, argv)


def main(argv=None):
    script, args = parse(argv)
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("run_with_submitit.py needs the 'submitit' package: pip install submitit") from None
    folder = Path(args.output_dir) / "submitit"
    executor = build_executor(args, folder)
    job = executor.submit(Trainer(script, args))
    print(f"submitted job {job.job_id}; logs in {folder}, checkpoints in {args.output_dir}")
    return job


if __name__ == "__main__":
    run_cli(main)
