"""The train stage: training, testing and inference of one run.

    job.py                the run_seg_tuning.py job: options -> RunSpec -> train or test
    loop.py               the training loop (epochs, validation, checkpoints)
    inference.py          --test and --infer_only --test with the best checkpoint
    predictor.py          load_run(run_dir) -> Predictor: a trained run on any B-scan
    build.py              the segmentation model and the data loaders
    validation.py         loss and confusion-matrix metrics on a split
    validation_metrics.py mIoU, aAcc, mAcc and the best-epoch rule
    checkpointing.py      what a checkpoint holds; save, load, resume and their checks
    precision.py          mixed precision (CUDA)
    runtime.py            device, torchrun processes, seeding, the console log
    distributed.py        torch.distributed helpers
    losses.py, optim.py   losses; parameter groups, optimisers and schedules
    protocols.py          protocol views and speed options (compile, fused optimisers, ...)
    feature_cache.py      cached frozen-backbone tokens (fully-frozen protocol)

It stands on mirage.run, mirage.data and mirage.models (with the fm_seg_config registry),
and never imports the evaluate, report or grid stages: the command line decides what
follows training (TensorBoard curves through ``on_epoch_end``).
"""
