"""Entry point of ``run_seg_prepare_data.py``: a dataset in the benchmark layout from OCT
volume files that eyepy reads (``pip install .[oct]``), with masks from their layer and
pixel annotations.

The console script ``run_seg_prepare_data`` (pyproject.toml) calls
:func:`prepare_data_command`. Only the parser loads up front: eyepy, numpy and OpenCV load
once the options are read, so ``-h`` answers at once and without eyepy. The work is
:func:`mirage.data.oct_dataset.build_dataset`; the rules (intensities, masks, splits,
spacing) are in docs/segmentation_benchmark.md, "Datasets from OCT files".
"""
import sys

from mirage.argparsing import ArgumentParser
from mirage.errors import UserError, exit_on_user_error


def prepare_parser():
    """The options of ``run_seg_prepare_data.py``."""
    parser = ArgumentParser(
        prog="run_seg_prepare_data.py",
        description="Build a dataset in the benchmark layout (INFO.json, train/val/test "
                    "with bscan/ and semseg/) from OCT volumes eyepy reads: .eye, HEYEX "
                    ".vol/.xml/.e2e, Duke .mat, Topcon .fda, RETOUCH folders (oct.mhd) and "
                    "folders of B-scans; masks from their layer heights and pixel "
                    "annotations. Needs eyepy: pip install .[oct]")
    parser.add_argument("-i", "--inputs", nargs="+", required=True, metavar="PATH",
                        help="volume files, or folders: a folder of volume files gives each "
                             "of them, a folder with oct.mhd is a RETOUCH volume, a folder "
                             "of images one volume of B-scans")
    parser.add_argument("-o", "--output", required=True, metavar="DATASET",
                        help="the dataset folder to write (new or empty; --overwrite "
                             "replaces an earlier output of this tool)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                        help="layer boundaries that make the masks, as eyepy names them "
                             "(default: every layer of the first volume); they are put in "
                             "their top-to-bottom order whatever order is given")
    parser.add_argument("--pixel_classes", nargs="*", default=None, metavar="NAME",
                        help="pixel annotations (fluids) painted over the layers as extra "
                             "classes, in this order (default: every one of the first "
                             "volume; none: give the option without names)")
    parser.add_argument("--split", nargs=3, type=float, default=[0.6, 0.2, 0.2],
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="shares of the patients (adding up to 1) or counts of patients "
                             "for train, val and test (default: %(default)s); a file "
                             "without a patient ID is a patient of its own")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier dataset of this tool at -o")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave out files that cannot be read (each named) instead of "
                             "stopping with nothing written")
    parser.add_argument("--num_workers", "--workers", dest="num_workers", type=int,
                        default=2, metavar="N",
                        help="threads of the final dataset check (default: %(default)s)")
    return parser


@exit_on_user_error
def prepare_data(argv=None):
    """Build the dataset (``run_seg_prepare_data.py``); returns the Prepared result, or
    exits with status 2 and one ``error:`` line per problem."""
    args = prepare_parser().parse_args(argv)
    if args.num_workers < 1:
        raise UserError("--num_workers must be at least 1")
    from mirage.data.check import format_summary  # deferred: numpy, OpenCV
    from mirage.data.oct_dataset import build_dataset  # deferred: numpy, OpenCV, eyepy
    from mirage.data.oct_files import find_sources  # deferred: numpy
    sources = find_sources(args.inputs)
    print(f"reading {len(sources)} volume(s), one at a time", flush=True)
    prepared = build_dataset(sources, args.output, layers=args.layers,
                             fluids=args.pixel_classes, split=args.split, seed=args.seed,
                             overwrite=args.overwrite, skip_bad=args.skip_bad,
                             workers=args.num_workers,
                             log=lambda line: print(line, flush=True))
    splits = {}
    for record in prepared.records:
        splits.setdefault(record.split, []).append(record)
    for name in ("train", "val", "test"):
        found = splits.get(name, [])
        patients = {r.patient or f"file:{r.volume}" for r in found}
        print(f"  {name}: {len(found)} volume(s) of {len(patients)} patient(s), "
              f"{sum(r.bscans for r in found)} B-scans", flush=True)
    print(format_summary(prepared.summary), flush=True)
    for note in prepared.notes:
        print(f"note: {note}", flush=True)
    print(f"wrote {prepared.summary.root} ({len(prepared.records)} volume(s)); it passed "
          "every check training runs", flush=True)
    return prepared


def prepare_data_command():
    """The console script: exit status 0, or 2 on an error (the return value is the
    exit status of a console script: None)."""
    prepare_data()
