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

Volume files (any file eyepy opens, by suffix, and ``.npy`` B-scan stacks (N, H, W)) are
read and predicted one at a time: ``<volume stem>_<i>.png`` per B-scan ``i`` (eyepy's
order) and, when the run's classes hold layers (the evaluation's layer stack,
mirage.evaluate.class_plan), ``<stem>.eye`` (predicted boundaries as eyepy layer
annotations, lesions as pixel annotations), ``<stem>_thickness.csv`` and an en-face map
``<stem>_thickness_<layer>.png`` per layer; boundaries by
mirage.evaluate.layers.boundary_rows, the evaluation's one definition.
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
                             "RGB; any size), single image files, and/or OCT volume files "
                             "(.eye .vol .xml .e2e .mat .fda through eyepy; .npy (N, H, W) "
                             "uint8/uint16 stacks), predicted one volume at a time")
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
    return split_inputs(inputs)[0]


def split_inputs(inputs):
    """``({stem: image path}, {stem: volume path})`` of ``-i``: image files and folders'
    images (not recursively); volume files (mirage.data.volume_inputs.VOLUME_SUFFIXES),
    given or in a folder. Every image header and .npy header is read, and eyepy checked
    for eyepy's files, so that a bad file stops the command before the model loads."""
    from mirage.data.volume_inputs import (VOLUME_SUFFIXES,  # deferred: numpy, eyepy
                                           check_volume_file, is_volume_file)
    from mirage.fileio import IMAGE_SUFFIXES, image_size, list_images  # deferred: OpenCV
    found, volumes = {}, {}
    for given in map(Path, inputs):
        if given.is_dir():
            files = list_images(given)
            volume_files = sorted(p for p in given.iterdir()
                                  if p.is_file() and is_volume_file(p))
            if not files and not volume_files:
                raise UserError(f"-i {given}: no images in it ({', '.join(IMAGE_SUFFIXES)}) "
                                f"nor volume files ({', '.join(VOLUME_SUFFIXES)})")
        elif given.is_file():
            files, volume_files = ([], [given]) if is_volume_file(given) else ([given], [])
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
        for path in volume_files:
            if path.stem in volumes:
                raise UserError(f"{volumes[path.stem]} and {path} share the name "
                                f"'{path.stem}', and their outputs are named after it; "
                                "rename or leave out one of them")
            volumes[path.stem] = path
    for path in found.values():
        image_size(path)  # UserError naming the file: empty, not an image, truncated
    for path in volumes.values():
        check_volume_file(path)  # .npy header; eyepy installed (else its install line)
    return found, volumes


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
    files, volumes = split_inputs(args.input)
    out = Path(args.output)
    check_output_folder(out, set(files), args.overlays)
    from mirage.train.predictor import load_run  # deferred: torch, timm
    runs = args.run_dir[0] if len(args.run_dir) == 1 else args.run_dir
    predictor = load_run(runs, device=args.device, weights=args.weights,
                         batch_size=args.batch_size, tta=args.tta)
    given = f"{len(files)} B-scans" + (f" + {len(volumes)} volumes" if volumes else "")
    print(f">> {predictor.describe()} on {predictor.device}: {given} -> {out}", flush=True)
    write_predictions(predictor, files, out, args.probabilities, args.overlays,
                      volumes=volumes)
    of_volumes = f" (and those of {len(volumes)} volumes)" if volumes else ""
    print(f">> wrote {len(files)} masks{of_volumes}"
          f"{' + probabilities' if args.probabilities else ''}"
          f"{' + overlays' if args.overlays else ''} to {out}", flush=True)
    return out


class _Outputs:
    """The files written into the staging folder, by name; a name given twice (two inputs
    whose outputs collide) is one line naming it."""

    def __init__(self, staging):
        self.staging, self.names = staging, []
        self._taken = set()

    def claim(self, name):
        if name in self._taken or name == RECORD:
            raise UserError(f"two outputs would be named {name}; rename one of the inputs")
        self._taken.add(name)
        self.names.append(name)
        return self.staging / name


def _write_bscan(outputs, classes, stem, labels, probs, gray=None):
    """``<stem>.png``, and ``<stem>.npz`` / ``<stem>_overlay.png`` when asked (``probs``
    given; ``gray``: a callable returning the B-scan, given for overlays)."""
    import numpy as np

    # deferred: OpenCV, matplotlib
    from mirage.fileio import atomic_path, write_png
    from mirage.report.overlays import class_overlay, write_png_rgb  # deferred
    write_png(outputs.claim(f"{stem}.png"), labels)
    if probs is not None:
        with atomic_path(outputs.claim(f"{stem}.npz")) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probs,
                                values=np.asarray(classes.values),
                                labels=np.asarray(classes.labels))
    if gray is not None:
        write_png_rgb(outputs.claim(f"{stem}{OVERLAY_SUFFIX}.png"),
                      class_overlay(gray(), labels, classes))


def layer_plan(classes):
    """The ClassPlan of a run's classes when they hold layers (the evaluation's layer
    stack: mirage.evaluate.class_plan), else None."""
    from mirage.evaluate.class_plan import plan_classes  # deferred: numpy
    try:
        plan = plan_classes(classes)
    except UserError:  # nothing to score: no layers either
        return None
    return plan if plan.layer_stack else None


def file_label(text):
    """A class label as a file name part: runs of other characters than letters, digits,
    ``.``, ``+`` and ``-`` become ``_`` (``ILM-IPL/INL`` -> ``ILM-IPL_INL``)."""
    import re
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "layer"


def write_volume(predictor, outputs, stem, path, plan, options):
    """Predict one volume file and write its outputs (module docstring); returns its
    entry of the prediction record. ``options``: (probabilities, overlays, desc)."""
    import csv
    import io

    import numpy as np

    from mirage.data.oct_files import import_eyepy  # deferred: eyepy's install line
    from mirage.data.volume_inputs import read_bscans, write_annotated_eye  # deferred
    from mirage.evaluate.thickness import (THICKNESS_COLUMNS,  # deferred: OpenCV
                                           VolumeLayers, thickness_rows_csv)
    from mirage.fileio import write_text  # deferred: OpenCV
    from mirage.progress import progress  # deferred: tqdm
    from mirage.report.thickness_maps import thickness_map_png  # deferred: matplotlib
    probabilities, overlays, desc = options
    classes = predictor.classes
    volume = read_bscans(path)
    images = volume.images
    entry = {"path": str(Path(path).resolve()), "bscans": int(images.shape[0]),
             "bscan_size": list(images.shape[1:]), "intensities": volume.how,
             "spacing_um": volume.spacing}
    layers = VolumeLayers(classes.labels, plan.layer_stack) if plan else None
    lesions = ({classes.labels[c]: np.zeros(images.shape, bool) for c in plan.lesion_classes}
               if plan else {})
    to_index = classes.value_to_index()
    results = predictor.iter_predictions(images, probabilities, np.float16)
    for i, (labels, probs) in progress(enumerate(results), total=len(images),
                                       unit="B-scan", desc=f"{stem} -> {desc}"):
        _write_bscan(outputs, classes, f"{stem}_{i}", labels, probs,
                     (lambda i=i: images[i]) if overlays else None)
        if layers is not None:
            index = to_index[labels]
            layers.add(index)
            for c in plan.lesion_classes:
                lesions[classes.labels[c]][i] = index == c
    if layers is None:
        return entry
    thickness = layers.thickness()
    axial = volume.spacing.get("axial_um")
    unit = "um" if axial else "px"
    text = io.StringIO()
    writer = csv.DictWriter(text, THICKNESS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(thickness_rows_csv(stem, layers.layers, thickness, axial))
    write_text(outputs.claim(f"{stem}_thickness.csv"), text.getvalue())
    maps = {}
    for layer, values in zip(layers.layers, thickness):
        name, k = f"{stem}_thickness_{file_label(layer)}.png", 1
        while name in maps.values():
            k += 1
            name = f"{stem}_thickness_{file_label(layer)}_{k}.png"
        maps[layer] = name
        shown = values * axial if axial else values
        outputs.claim(name).write_bytes(
            thickness_map_png(shown, f"{stem}: {layer}", unit, volume.spacing))
    entry.update(thickness_unit=unit, layers=layers.layers, boundaries=layers.boundaries,
                 lesions=list(lesions), thickness_maps=maps, eye=None)
    try:
        import_eyepy()
    except UserError as err:  # a .npy stack without eyepy: everything but the .eye file
        print(f"note: {stem}.eye not written: {err}", flush=True)
        return entry
    write_annotated_eye(outputs.claim(f"{stem}.eye"), volume,
                        dict(zip(layers.boundaries, layers.heights())), lesions)
    entry["eye"] = f"{stem}.eye"
    return entry


def write_predictions(predictor, files, out, probabilities=False, overlays=False,
                      volumes=None):
    """``<stem>.png`` (INFO.json values), ``<stem>.npz`` and ``<stem>_overlay.png`` for
    ``files`` ({stem: path}) and each B-scan of ``volumes`` ({stem: volume file}, with
    their layer files: :func:`write_volume`) into ``out``, written aside and swapped in
    whole, with ``prediction_record.json``."""
    import numpy as np

    # deferred: OpenCV, matplotlib
    from mirage.fileio import atomic_folder, read_gray, write_text
    from mirage.progress import progress  # deferred: tqdm, with the rest
    from mirage.run.predictions import file_entry  # deferred, with the rest
    from mirage.report.overlays import prediction_legend_png  # deferred: matplotlib
    classes = predictor.classes
    volumes = volumes or {}
    with atomic_folder(out) as staging:
        outputs = _Outputs(staging)
        if overlays:  # which colour is which class
            outputs.claim(OVERLAY_LEGEND).write_bytes(prediction_legend_png(classes))
        results = predictor.iter_predictions(files.values(), probabilities, np.float16)
        for (stem, path), (labels, probs) in progress(zip(files.items(), results),
                                                      total=len(files), unit="B-scan",
                                                      desc=f"predicting -> {out.name}/"):
            _write_bscan(outputs, classes, stem, labels, probs,
                         (lambda path=path: read_gray(path)) if overlays else None)
        plan = layer_plan(classes) if volumes else None
        volume_entries = {stem: write_volume(predictor, outputs, stem, path, plan,
                                             (probabilities, overlays, f"{out.name}/"))
                          for stem, path in volumes.items()}
        # "runs": every run and checkpoint that predicted (several: an ensemble), "tta";
        # "run_dir" and "epoch" as before for a single run
        made_by = predictor.record()
        record = {**({"run_dir": made_by["runs"][0]["run_dir"],
                      "epoch": made_by["runs"][0]["epoch"]}
                     if len(made_by["runs"]) == 1 else {}),
                  **made_by, "classes": classes.entries(),
                  "inputs": {stem: str(Path(path).resolve()) for stem, path in files.items()},
                  # [size, SHA-256] of each input as predicted: scoring checks the scored
                  # split's B-scans against these, not against the files as they are now
                  "input_files": {stem: file_entry(path) for stem, path in files.items()},
                  **({"volumes": volume_entries} if volumes else {}),
                  "files": sorted(outputs.names)}
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
