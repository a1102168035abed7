"""Entry points of ``run_seg_predict.py`` (a trained run on any folder of B-scans) and
``run_seg_check_data.py`` (training's checks of a dataset, with a summary).

The console scripts ``run_seg_predict`` and ``run_seg_check_data`` (pyproject.toml) call
:func:`predict_command` and :func:`check_data_command`. Only the parsers load up front:
torch, OpenCV and matplotlib load once the options are read, so ``-h`` answers at once.

The output folder of run_seg_predict.py (``-o OUT``) is written aside and swapped in whole
when every input is predicted, so a bad input file or a kill leaves OUT as it was. OUT
must be new, empty, or an earlier output of run_seg_predict.py (it holds
``prediction_record.json`` and only the files listed there), which is then replaced;
anything else is refused, so that no file of the user's is ever deleted. An OUT that is a
symlink is followed: the folder it points to is replaced and the link stays. An OUT that
is a mount point cannot be swapped: the outputs are written inside it, and an earlier
output there is replaced file by file once every new file is written
(:func:`mirage.fileio.atomic_folder`). Paths may start with ``~``, even quoted.
"""
import json
import os
import sys
from pathlib import Path

from mirage.argparsing import ArgumentParser
from mirage.errors import UserError, exit_on_user_error

RECORD = "prediction_record.json"  # what run_seg_predict.py wrote into OUT, and from what
# (= mirage.run.predictions.PREDICTION_RECORD, read by prediction_source; not imported
# here, which would load OpenCV before -h answers)
OVERLAY_SUFFIX = "_overlay"
# The overlays' colour legend: never a mask (<stem>.png) nor an overlay (<stem>_overlay.png)
# of an input, as input stems are refused when they would collide with it.
OVERLAY_LEGEND = "overlays_legend.png"


# ============================================================================ predict
def _user_path(text):
    """A path option's value with ``~`` expanded: the shell leaves ``'~/x'`` and
    ``--opt=~/x`` as they are, and a folder named ``~`` is never what was meant."""
    return os.path.expanduser(text)


def predict_parser():
    """The options of ``run_seg_predict.py``."""
    parser = ArgumentParser(
        prog="run_seg_predict.py",
        description="Predict B-scans with a trained run: one mask PNG of INFO.json values "
                    "per input (<stem>.png, the input's size), optionally the class "
                    "probabilities and colour overlays.")
    parser.add_argument("--run_dir", required=True, nargs="+", metavar="RUN_DIR",
                        type=_user_path,
                        help="the trained run: <output>/<version>/<dataset>/<run name>/; "
                             "several runs (same classes and input size, e.g. the seeds "
                             "of one model) predict as an ensemble: their probabilities "
                             "averaged")
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="IN",
                        type=_user_path,
                        help="folders of B-scans (PNG, TIFF, BMP, JPEG; 8/16-bit, gray or "
                             "RGB; any size) and/or single image files")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", type=_user_path,
                        help="output folder: new, empty, or an earlier output of this "
                             "command (replaced whole; a mount point is written into)")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <stem>.npz: 'probabilities' (K, H, W) float16 "
                             "softmax, 'values' and 'labels' of the K classes")
    parser.add_argument("--overlays", action="store_true",
                        help="also write <stem>_overlay.png: the B-scan with the predicted "
                             "classes tinted")
    parser.add_argument("--tta", default="none", choices=("none", "flip"),
                        help="test-time augmentation: 'flip' averages the probabilities "
                             "of each B-scan and of its left-right mirror image (flipped "
                             "back) before the argmax (default: none)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch_size", type=int, default=None, metavar="N",
                        help="B-scans per forward pass (default: the run's --batch_size)")
    parser.add_argument("--weights", default=None, metavar="FILE", type=_user_path,
                        help="the foundation model's weights file, if it moved since "
                             "training (default: the path in config.yaml; its SHA-256 "
                             "must match)")
    return parser


def input_files(inputs):
    """``{stem: path}`` of the images given (folders are listed, not recursively); every
    header is read, so a bad file stops the command before the model loads."""
    from mirage.fileio import IMAGE_SUFFIXES, image_size, list_images  # deferred: OpenCV
    found = {}
    for given in map(Path, inputs):
        if given.is_dir():
            files = list_images(given)
            if not files:
                raise UserError(f"-i {given}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
        elif given.is_file():
            files = [given]
        else:
            raise UserError(f"-i {given}: no such file or folder")
        for path in files:
            if path.stem in found:
                raise UserError(f"{found[path.stem]} and {path} would both be predicted "
                                f"as {path.stem}.png; rename or leave out one of them")
            if f"{path.stem}.png" == OVERLAY_LEGEND:
                raise UserError(f"{path}: its mask would be named {OVERLAY_LEGEND}, the "
                                "overlays' colour legend; rename the file")
            found[path.stem] = path
    for path in found.values():
        image_size(path)  # UserError naming the file: empty, not an image, truncated
    return found


def check_output_folder(out, stems, overlays):
    """Refuse an OUT that holds files this command did not write (they would be lost), or
    inputs whose outputs would collide."""
    from mirage.fileio import IN_PLACE_PREFIX, replaceable_target  # deferred: OpenCV
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: is a file; give a folder")
    if overlays:
        clash = sorted(s for s in stems if s.endswith(OVERLAY_SUFFIX)
                       and s[:-len(OVERLAY_SUFFIX)] in stems)
        if clash:
            raise UserError(f"inputs {clash[0][:-len(OVERLAY_SUFFIX)]} and {clash[0]}: the "
                            f"overlay of the first would be {clash[0]}.png, the mask of the "
                            "second; rename one of them")
    if not out.is_dir():
        return
    target = replaceable_target(out)
    # Not the user's files: a mount point's lost+found (kept), and the hidden folders a
    # killed write left there (the next write removes them).
    own = {"lost+found"} if os.path.ismount(target) else set()
    present = sorted(p.name for p in target.iterdir()
                     if p.name not in own and not p.name.startswith(IN_PLACE_PREFIX))
    if not present:
        return
    listed = set()
    if RECORD in present:
        try:
            listed = set(json.loads((target / RECORD).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
    foreign = [name for name in present if name != RECORD and name not in listed]
    if RECORD not in present or foreign:
        shown = ", ".join((foreign or present)[:3])
        raise UserError(f"-o {out}: holds files run_seg_predict.py did not write ({shown}); "
                        "give a new or empty folder (an earlier output of this command is "
                        "replaced whole)")


@exit_on_user_error
def predict(argv=None):
    """Predict every input B-scan (``run_seg_predict.py``); returns the output folder."""
    args = predict_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    files = input_files(args.input)
    out = Path(args.output)
    check_output_folder(out, set(files), args.overlays)
    from mirage.train.predictor import load_run  # deferred: torch, timm
    runs = args.run_dir[0] if len(args.run_dir) == 1 else args.run_dir
    predictor = load_run(runs, device=args.device, weights=args.weights,
                         batch_size=args.batch_size, tta=args.tta)
    print(f">> {predictor.describe()} on {predictor.device}: {len(files)} B-scans -> "
          f"{out}", flush=True)
    write_predictions(predictor, files, out, args.probabilities, args.overlays)
    print(f">> wrote {len(files)} masks{' + probabilities' if args.probabilities else ''}"
          f"{' + overlays' if args.overlays else ''} to {out}", flush=True)
    return out


def write_predictions(predictor, files, out, probabilities=False, overlays=False):
    """``<stem>.png`` (INFO.json values), ``<stem>.npz`` and ``<stem>_overlay.png`` for
    ``files`` ({stem: path}) into ``out``, written aside and swapped in whole, with
    ``prediction_record.json``."""
    import numpy as np

    # deferred: OpenCV, matplotlib
    from mirage.fileio import atomic_folder, atomic_path, read_gray, write_png, write_text
    from mirage.progress import progress  # deferred: tqdm, with the rest
    from mirage.report.overlays import (class_overlay, prediction_legend_png,  # deferred
                                        write_png_rgb)
    classes = predictor.classes
    written = []
    with atomic_folder(out) as staging:
        if overlays:  # which colour is which class
            (staging / OVERLAY_LEGEND).write_bytes(prediction_legend_png(classes))
            written.append(OVERLAY_LEGEND)
        results = predictor.iter_predictions(files.values(), probabilities, np.float16)
        for (stem, path), (labels, probs) in progress(zip(files.items(), results),
                                                      total=len(files), unit="B-scan",
                                                      desc=f"predicting -> {out.name}/"):
            write_png(staging / f"{stem}.png", labels)
            written.append(f"{stem}.png")
            if probs is not None:
                with atomic_path(staging / f"{stem}.npz") as tmp, open(tmp, "wb") as handle:
                    np.savez_compressed(handle, probabilities=probs,
                                        values=np.asarray(classes.values),
                                        labels=np.asarray(classes.labels))
                written.append(f"{stem}.npz")
            if overlays:
                write_png_rgb(staging / f"{stem}{OVERLAY_SUFFIX}.png",
                              class_overlay(read_gray(path), labels, classes))
                written.append(f"{stem}{OVERLAY_SUFFIX}.png")
        # "runs": every run and checkpoint that predicted (several: an ensemble), "tta";
        # "run_dir" and "epoch" as before for a single run
        made_by = predictor.record()
        record = {**({"run_dir": made_by["runs"][0]["run_dir"],
                      "epoch": made_by["runs"][0]["epoch"]}
                     if len(made_by["runs"]) == 1 else {}),
                  **made_by, "classes": classes.entries(),
                  "inputs": {stem: str(Path(path).resolve()) for stem, path in files.items()},
                  "files": sorted(written)}
        write_text(staging / RECORD, json.dumps(record, indent=1) + "\n")
    return out


# ============================================================================ check data
def check_data_parser():
    """The options of ``run_seg_check_data.py``."""
    parser = ArgumentParser(
        prog="run_seg_check_data.py",
        description="Run every check training runs on datasets in the benchmark layout "
                    "and print a summary of each (volumes, B-scans, class shares, sizes, "
                    "bit depths). Exit status 2 if any dataset fails.")
    parser.add_argument("--data_path", nargs="+", required=True, metavar="D",
                        help="dataset folders (<D>/INFO.json, <D>/{train,val,test}/"
                             "{bscan,semseg}/)")
    parser.add_argument("--mapping_fn", default=None, metavar="F",
                        help="class table (INFO.json format) for every dataset given, as "
                             "training's --mapping_fn (default: <D>/INFO.json)")
    parser.add_argument("--num_workers", "--workers", dest="num_workers", type=int,
                        default=4, metavar="N",
                        help="threads decoding images (default: %(default)s)")
    return parser


@exit_on_user_error
def check_data(argv=None):
    """Check each dataset (``run_seg_check_data.py``); returns the summaries, or exits
    with status 2 after all are checked when any failed (one ``error:`` line each)."""
    args = check_data_parser().parse_args(argv)
    if args.num_workers < 1:
        raise UserError("--num_workers must be at least 1")
    from mirage.data.check import check_dataset, format_summary  # deferred: numpy, OpenCV
    summaries, failed = [], 0
    for data_path in args.data_path:
        try:
            summary = check_dataset(data_path, args.mapping_fn, workers=args.num_workers)
        except UserError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        summaries.append(summary)
        print(format_summary(summary), flush=True)
    if failed:
        print(f"{failed} of {len(args.data_path)} dataset(s) failed the checks (errors "
              "above)", flush=True)
        sys.exit(2)
    print(f"{len(summaries)} dataset(s) passed every check training runs", flush=True)
    return summaries


# Console scripts exit with their function's return value: these return None (status 0);
# errors exit with status 2.
def predict_command():
    predict()


def check_data_command():
    check_data()
