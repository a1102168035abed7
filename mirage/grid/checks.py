"""Pre-flight checks: what must hold before any job of the grid starts.

The grid is at most ``MAX_JOBS`` commands (counted before any job is built), the SLURM
cluster is usable, the base command's program exists, the requested GPUs exist,
``--runners`` fits the GPU slots, and no two ``run_seg_tuning.py`` training jobs resolve
to one run directory (a dry resolution of each job's arguments). Each failed check is a
:class:`mirage.errors.UserError`, so the runner stops with one line and exit 2.
"""
import contextlib
import io
import os
import shutil
import subprocess

from mirage.errors import UserError

# For tests and dry runs on machines without GPUs: comma-separated GPU ids that "exist".
FAKE_GPUS_ENV = "MIRAGE_RUNNER_FAKE_GPUS"
# For tests: the submitit cluster used by --runner-slurm ("local" runs the array here).
CLUSTER_ENV = "MIRAGE_RUNNER_CLUSTER"
# A job whose base command runs this program gets its run directory checked (dry resolution).
TUNING_SCRIPT = "run_seg_tuning.py"
# The training command as a script or as the command `pip install .` puts on the PATH.
TUNING_COMMANDS = (TUNING_SCRIPT, "run_seg_tuning")
# The most commands one ./runner call runs (docs/runner.md, "Grid size"): every job is built,
# its run directory resolved and its log named before the first starts (and a SLURM array
# is submitted whole), so a grid a typo away from billions must be refused, not built.
MAX_JOBS = 100_000


# ----------------------------------------------------------------------------- grid size


def check_grid_size(grid):
    """The number of commands of ``grid``, counted without building them; UserError when it
    is over ``MAX_JOBS`` (or the filters are too intricate to count)."""
    count = grid.count_jobs()
    if count is not None and count <= MAX_JOBS:
        return count
    axes = ", ".join(f"{axis.option} x{len(axis.values)}" for axis in grid.axes
                     if len(axis.values) > 1)
    filtered = grid.options.filters
    if count is None:
        size = (f"{grid.num_combinations} combinations ({axes}), and its --runner-filter "
                "groups are too many to count what they leave")
    elif filtered:
        size = (f"{count} commands ({axes}: {grid.num_combinations} combinations, "
                f"{grid.num_combinations - count} removed by --runner-filter)")
    else:
        size = f"{count} commands ({axes})"
    raise UserError(f"the grid has {size}; one ./runner call runs at most {MAX_JOBS} "
                    "commands: narrow the grid with fewer values per option or a "
                    "--runner-filter, or split it into several ./runner calls")


# ----------------------------------------------------------------------------- machine


def check_cluster():
    """The submitit cluster for --runner-slurm: ``$MIRAGE_RUNNER_CLUSTER`` (tests) or slurm,
    which needs sbatch on this machine."""
    cluster = os.environ.get(CLUSTER_ENV, "slurm")
    if cluster not in ("slurm", "local", "debug"):
        raise UserError(f"${CLUSTER_ENV} must be slurm, local or debug, got '{cluster}'")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--runner-slurm: sbatch is not found; run the runner on a SLURM "
                        "login node (or drop --runner-slurm to run here)")
    return cluster


def detect_gpu_ids():
    """GPU ids of this machine and where they come from.

    ``$MIRAGE_RUNNER_FAKE_GPUS`` (testing) wins, then ``nvidia-smi -L``, then torch.
    """
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        items = [item.strip() for item in fake.split(",") if item.strip()]
        if not all(item.isdigit() for item in items):
            raise UserError(f"${FAKE_GPUS_ENV} must be GPU ids separated by commas, got "
                            f"'{fake}'")
        return sorted({int(item) for item in items}), f"${FAKE_GPUS_ENV}"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            count = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
            return list(range(count)), "nvidia-smi -L"
    except (OSError, subprocess.SubprocessError):
        pass  # no driver tools: ask torch instead
    try:
        import torch  # deferred: heavy, and only the fallback when nvidia-smi is missing
    except ImportError:
        return [], "no nvidia-smi and no torch"
    return list(range(torch.cuda.device_count())), "torch.cuda.device_count()"


def check_gpus(requested):
    """Every requested GPU id must exist on this machine."""
    existing, source = detect_gpu_ids()
    for gpu in requested:
        if gpu not in existing:
            have = (f"GPUs {','.join(map(str, existing))}" if existing
                    else "no GPU")
            raise UserError(f"--runner-gpus: GPU {gpu} does not exist (this machine has "
                            f"{have}, according to {source}); pick ids from that list")


def check_program(program):
    """The base command's program must be runnable here, or every job would fail."""
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise UserError(f"base command '{program}' is not an executable file; check the "
                            "first word before '--'")
    elif shutil.which(program) is None:
        raise UserError(f"base command '{program}' is not found on PATH; check the first "
                        "word before '--' (activate the environment that provides it?)")


def local_parallelism(options):
    """How many jobs run at once locally: --runners, else one per GPU slot, else 1."""
    slots = options.gpus
    if options.runners is None:
        return len(slots) if slots else 1
    if slots and options.runners > len(slots):
        raise UserError(
            f"--runners {options.runners} is more than the {len(slots)} GPU slot(s) of "
            f"--runner-gpus {','.join(map(str, slots))}: each job needs a free GPU (list an "
            "id twice, e.g. 0,0,1,1, to run two jobs on one GPU)")
    return options.runners


# ----------------------------------------------------------------------------- run directories


def tuning_args(command):
    """The arguments after ``run_seg_tuning.py`` in ``command`` (python, torchrun or the
    script itself), or None when the command runs another program."""
    for i, token in enumerate(command):
        if os.path.basename(token) in TUNING_COMMANDS:
            return command[i + 1:]
    return None


def _choice_text(choice):
    return " ".join(f"{option} {value}" for option, value in choice)


def _quietly(func, *args):
    """Call ``func``; argparse's usage text and exit become one UserError line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            return func(*args)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else "invalid arguments") from None


class RunDirCheck:
    """Dry resolution of each job's run directory, to refuse a grid in which two training
    jobs of ``run_seg_tuning.py`` would write into one directory (one would skip, resume or
    overwrite the other's run). Jobs with ``--test``/``--infer_only`` only read their run
    and are not compared; commands of other programs are not looked at.
    """

    def __init__(self):
        self.by_dir = {}  # real path of a run directory -> [(job index, choice)]
        self.resolve = None

    def add(self, job):
        args = tuning_args(job.command)
        if args is None:
            return
        if self.resolve is None:
            # deferred: heavy (OpenCV through mirage.data), and only tuning grids need it
            from mirage.run.identity import run_dir_for_argv
            self.resolve = run_dir_for_argv
        try:
            run_dir = _quietly(self.resolve, args)
            if run_dir is None or not _trains(args):
                return  # None: a --demo whose inputs are written when it starts
        except UserError as err:
            where = f" ({_choice_text(job.choice)})" if job.choice else ""
            raise UserError(f"job {job.index}{where} has bad arguments, so the grid is not "
                            f"started: {err}") from None
        key = os.path.realpath(run_dir)
        self.by_dir.setdefault(key, []).append((job.index, job.choice))

    def check(self):
        """Raise a UserError naming the first jobs that share a directory."""
        groups = [(path, jobs) for path, jobs in self.by_dir.items() if len(jobs) > 1]
        if not groups:
            return
        path, jobs = groups[0]
        numbers = [str(index) for index, _ in jobs]
        named = ", ".join(numbers[:-1]) + " and " + numbers[-1]
        differ = [(i, option) for i, (option, _) in enumerate(jobs[0][1])
                  if len({choice[i][1] for _, choice in jobs}) > 1]
        values = "; ".join(f"{option} " + " vs ".join(choice[i][1] for _, choice in jobs)
                           for i, option in differ)
        values = f" ({values})" if values else ""
        more = (f"; {len(groups) - 1} more group(s) of jobs collide as well"
                if len(groups) > 1 else "")
        raise UserError(
            f"jobs {named}{values} would {'both' if len(jobs) == 2 else 'all'} train into "
            f"one run directory {path}, as "
            "these values do not change the run identity; drop the duplicates, or give the "
            f"jobs distinct run directories (e.g. a --version per job; docs/runner.md){more}")


def _trains(args):
    """Whether a run_seg_tuning.py argument list trains (no --test / --infer_only, also
    not through its -c YAML file)."""
    # deferred: the training options (yaml, decoder registry) only tuning grids need
    from mirage.config import parse_config

    config = _quietly(parse_config, args)[0]
    return not (config.get("test") or config.get("infer_only"))
