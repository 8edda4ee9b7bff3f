"""The `experiment.py` command line: one parser in LightningCLI's style (jsonargparse, `--config` YAML, nested
`--slurm.*` options, every option in `--help`). Training options after `--` go to every job unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace


@dataclass
class SlurmOptions:
    """What each SLURM job asks for (submitit's SlurmExecutor parameters).

    Args:
        partition: the partition to submit to; setting it selects the SLURM executor.
        time_min: time limit of each job, minutes (a requeued job gets it again).
        nodes: nodes per job (DDP across them under srun).
        tasks_per_node: DDP ranks per node, one GPU each on a GPU partition.
        gpus_per_node: GPUs per node (0 on a CPU partition).
        cpus_per_task: CPU cores per rank (nnU-Net's augmentation workers run there).
        mem_gb: memory per node in GB (None: the partition's default).
        array_parallelism: at most this many folds run at once.
        signal_delay_s: SIGUSR1 this long before the time limit: save, requeue, continue.
        extra_sbatch: more `#SBATCH` lines, as "--key=value" (e.g. "--qos=high", "--account=lab").
        setup: shell lines run in the job before training (module load, conda activate).
    """

    partition: str | None = None
    time_min: int = 24 * 60
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float | None = None
    array_parallelism: int = 256
    signal_delay_s: int = 90
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="experiment.py", default_env=False, description=(
        "Train a dataset's configurations x folds as jobs (local GPUs/CPUs or SLURM, via submitit), then run "
        "nnUNetv2_find_best_configuration. Rerunning skips finished folds and resumes unfinished ones. "
        "`experiment.py status ...` (same options) prints one row per fold. Training options after `--` "
        "(or under train_args in the YAML) go to every job's train.py unchanged."))
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options (configs/experiment.yaml).")
    parser.add_argument("--plans", type=str, default="nnUNetResEncUNetLPlans", help="nnU-Net plans identifier.")
    parser.add_argument("--dataset", type=str, required=True, help="Dataset ID or name in $nnUNet_preprocessed.")
    parser.add_argument("--configurations", type=str, nargs="+", default=["3d_fullres"],
                        help="Configurations to train; 3d_cascade_fullres waits for its 3d_lowres folds.")
    parser.add_argument("--folds", type=str, nargs="+", default=["0", "1", "2", "3", "4"], help="Folds of nnU-Net's split.")
    parser.add_argument("--trainer_name", type=str, default="nnUNetTrainer_Lightning",
                        help="The <trainer> part of the output folder (train.py's --data.trainer_name).")
    parser.add_argument("--results_dir", type=str | None, default=None, help="Where runs go; None: $nnUNet_results.")
    parser.add_argument("--log_dir", type=str | None, default=None,
                        help="Job scripts and logs; None: <results>/<dataset>/experiment_logs.")
    parser.add_argument("--gpus", type=str, nargs="+", default=None,
                        help="Local executor: one job per listed GPU at a time (--gpus 0,1,2,3 or --gpus 0 1 2 3).")
    parser.add_argument("--jobs", type=int, default=1, help="Local executor without --gpus: concurrent CPU jobs.")
    parser.add_argument("--slurm", type=SlurmOptions, default=SlurmOptions(), help="SLURM executor options.")
    parser.add_argument("--stage_to", type=str | None, default=None,
                        help="Copy the preprocessed dataset to this node-local folder (e.g. $SLURM_TMPDIR) and train "
                             "from the copy; files already current (size, mtime) are not copied again.")
    parser.add_argument("--stage_clean", type=bool, default=False,
                        help="Remove the staged copy when the job ends (leave false when folds share a node's copy).")
    parser.add_argument("--find_best", type=bool, default=True,
                        help="Run nnUNetv2_find_best_configuration once every fold is done.")
    parser.add_argument("--wait", type=bool, default=True,
                        help="SLURM: wait for the jobs and print the result; false: submit and return (see status).")
    parser.add_argument("--poll_s", type=float, default=5.0, help="Seconds between scheduler queries while waiting.")
    parser.add_argument("--train_args", type=list[str], default=[], help="Options for every job's train.py.")
    return parser


def parse(argv: list[str]) -> tuple[str, Namespace]:
    """('run' or 'status', the options); everything after `--` is appended to train_args."""
    command = "run"
    if argv and argv[0] in ("run", "status"):
        command, argv = argv[0], argv[1:]
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    cfg = build_parser().parse_args(argv)
    cfg.train_args = [*cfg.train_args, *passthrough]
    cfg.gpus = gpu_list(cfg.gpus)
    cfg.folds = [str(f) for f in cfg.folds]
    return command, cfg


def gpu_list(values: list[str] | None) -> list[int] | None:
    """`--gpus 0,1` or `--gpus 0 1` as [0, 1]."""
    if not values:
        return None
    items = [v for value in values for v in str(value).split(",") if v.strip()]
    try:
        return [int(v) for v in items]
    except ValueError:
        raise SystemExit(f"error: --gpus {' '.join(map(str, values))}: expected GPU indices such as 0,1,2,3.") from None
