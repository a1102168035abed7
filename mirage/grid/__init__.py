"""The grid stage: ``./runner``, a grid of commands from one command line, run and reported.

    runner_options.py the runner's own options (before '--'), their values, the usage text
    expand.py         the grid: value axes (after '--'), filters, one Job per combination
    checks.py         pre-flight checks: grid size, cluster, program, GPUs, --runners, run dirs
    local.py          the grid run here: the job pool, one GPU per job, retries, timeouts, Ctrl-C
    one_command.py    one command: retries, time limit, log header; the body of each SLURM task
    progress.py       the progress line: finished, failed, running, the time left
    slurm.py          the SLURM backend: one submitit job array, waited for, detached, looked at
    queue.py          what became of each array task: squeue, the task's result file, sacct if any
    runner.py         main(): the steps in order, the log folder, the report and its summary file

It may import mirage.errors, mirage.fileio, mirage.workers, mirage.config and mirage.run
(lower layers), never the train, evaluate, report, cli or demo stages: it runs those as
commands. This file imports nothing, so ``./runner -h`` stays light.
"""
