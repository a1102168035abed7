"""The docs' "Adding a decoder" example, dropped into the decoder registry, trains end to
end; log.txt records both selection rules and per-class IoU as the docs say."""
import json
import re
import sys

import pytest

import run_seg_tuning
from conftest import REPO
from mirage.models import decoders
from mirage.options import OPTION_BY_NAME

DOCS = REPO / "docs" / "segmentation_tuning.md"


def docs_example():
    """(file name, code) of the python block in the "Adding a decoder" section."""
    section = DOCS.read_text(encoding="utf-8").split("### Adding a decoder", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = code.splitlines()[0].lstrip("# ").strip()
    assert path.startswith("mirage/models/decoders/") and path.endswith(".py")
    return path.rsplit("/", 1)[1], code


@pytest.fixture
def example_decoder(tmp_path, monkeypatch):
    """The example as a file of the registry (an extra folder on the package path)."""
    file_name, code = docs_example()
    folder = tmp_path / "more_decoders"
    folder.mkdir()
    (folder / file_name).write_text(code, encoding="utf-8")
    monkeypatch.setattr(decoders, "__path__", [*decoders.__path__, str(folder)])
    name = file_name[:-len(".py")]
    yield name
    sys.modules.pop(f"mirage.models.decoders.{name}", None)


def read_log(out):
    (log,) = out.rglob("log.txt")
    return [json.loads(line) for line in log.read_text().splitlines()]


def tiny_run(dataset, weights, out, *extra):
    run_seg_tuning.main([
        "--weights", str(weights), "--data_path", str(dataset), "--input_size", "32", "48",
        "--patch_size", "16", "--batch_size", "2", "--num_workers", "0", "--lr", "1e-3",
        "--aug_name", "none", "--drop_path_encoder", "0", "--base_output_dir", str(out),
        *map(str, extra)])
    return read_log(out)


def test_docs_example_is_a_choice_and_trains(example_decoder, tiny_dataset, tiny_weights,
                                             tmp_path, capsys):
    assert example_decoder == "mlp"
    assert example_decoder in decoders.names()
    assert example_decoder in OPTION_BY_NAME["output_adapter"].choices  # read at use
    epochs = tiny_run(tiny_dataset, tiny_weights, tmp_path / "out", "--epochs", 2,
                      "--output_adapter", example_decoder)
    captured = capsys.readouterr()
    assert "best mIoU_all" in captured.out + captured.err
    val = [e for e in epochs if "epoch" in e]
    assert len(val) == 2
    for entry in val:
        assert entry["val/mIoU"] == entry["val/mIoU_all"]      # the paper's rule selects
        assert set(entry["val/IoU"]) == {"Background", "Layer", "Fluid"}
        for key in ("val/mIoU_all", "val/mIoU_fg", "val/aAcc", "val/mAcc"):
            assert 0.0 <= entry[key] <= 1.0
        present = [v for v in entry["val/IoU"].values() if v is not None]
        assert entry["val/mIoU_all"] == pytest.approx(sum(present) / len(present))
        foreground = [entry["val/IoU"][k] for k in ("Layer", "Fluid")
                      if entry["val/IoU"][k] is not None]
        assert entry["val/mIoU_fg"] == pytest.approx(sum(foreground) / len(foreground))


def test_select_metric_fg_is_logged_as_val_miou(tiny_dataset, tiny_weights, tmp_path, capsys):
    epochs = tiny_run(tiny_dataset, tiny_weights, tmp_path / "out", "--epochs", 1,
                      "--output_adapter", "linear", "--select_metric", "mIoU_fg")
    (entry,) = [e for e in epochs if "epoch" in e]
    assert entry["val/mIoU"] == entry["val/mIoU_fg"] != entry["val/mIoU_all"]
    captured = capsys.readouterr()
    assert "best mIoU_fg" in captured.out + captured.err
