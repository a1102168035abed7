"""MIRAGE segmentation tuning: train decoders on frozen retinal-OCT foundation models.

One folder per stage, each importing only the stages below it (docs/architecture.md;
tests/test_architecture.py keeps it so):

    errors.py, fileio.py, checkpoint_io.py, workers.py, argparsing.py, units.py,
    progress.py           the ground floor
    data/, models/        datasets in the benchmark layout; encoders and decoders
    options.py            the options table: every option once, with its metadata
    protocol.py           the tuning protocol (--tuning and its older aliases)
    config.py             the options: defaults < YAML < command line; a run read back
    option_checks.py      the checks of option values and of options against each other
    run/                  one run directory: RunFolder, identity, RunSpec, predictions
    train/, evaluate/     training/testing/inference; per-volume scoring
    report/               run and study reports, tables, statistics
    grid/                 ./runner: grids of commands, locally or on SLURM
    cli.py, demo.py, report_cli.py, predict_cli.py, prepare_cli.py
                          the entry points: the only places that chain stages
"""

__version__ = "0.1.0"
