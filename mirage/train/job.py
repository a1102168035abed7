"""One ``run_seg_tuning.py`` job: train (default), test (``--test``) or predict
(``--infer_only --test``) one run.

    main(config, on_epoch_end=None) -> the run directory

The options are checked and resolved into a RunSpec once, the runtime started; then the
run folder is locked, its identity checked, and the job runs.
"""
import dataclasses

from mirage.errors import UserError
from mirage.option_checks import check_config
from mirage.run.identity import check_identity, nearest_runs
from mirage.run.spec import resolve_spec
from mirage.train.inference import test_or_infer
from mirage.train.loop import train
from mirage.train.runtime import start_runtime


def main(config, on_epoch_end=None, announce=True):
    """Train, test or predict the run of ``config`` (every option; parse_config).

    ``on_epoch_end(folder)``: see mirage.train.loop.train. ``announce=False``: the run
    folder, class and model lines were printed by an earlier job of this process (the
    demo's prediction after its training) and are not repeated.
    """
    check_config(config)
    spec = resolve_spec(config)
    runtime = dataclasses.replace(start_runtime(spec.runtime, spec.loop.seed),
                                  announce=announce)
    folder, classes = spec.folder, spec.classes
    runtime.setup_line(f">> run directory: {folder.path}")
    runtime.setup_line(f">> classes: {dict(zip(classes.labels, classes.values))}; ignore "
                       f"index: {spec.data.ignore_index}")

    if spec.task.test:
        if not folder.best_checkpoint.is_file():
            raise UserError(f"no trained checkpoint: {folder.best_checkpoint} not found; "
                            "train this run first (the same command without "
                            f"--test/--infer_only){nearest_runs(folder.path, spec.identity)}")
        with runtime.lock(folder.path):
            check_identity(folder.path, spec.identity)
            return test_or_infer(spec, runtime)
    if classes.num_classes < 2:
        raise UserError(f"{classes.source}: only {classes.num_classes} class; a segmentation "
                        "model needs at least two (e.g. background and one layer)")
    with runtime.lock(folder.path):
        check_identity(folder.path, spec.identity)
        return train(spec, runtime, on_epoch_end)
