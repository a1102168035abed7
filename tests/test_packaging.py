"""pyproject.toml: what `pip install .` installs, and commands whose -h needs no torch."""
import importlib
import subprocess
import sys

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_console_scripts_resolve_to_functions():
    scripts = PROJECT["project"]["scripts"]
    assert set(scripts) == {"run_seg_tuning", "run_seg_eval", "run_seg_report",
                            "mirage_runner", "run_seg_predict", "run_seg_check_data",
                            "run_seg_prepare_data"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_package_and_api_module_are_installed():
    setuptools = PROJECT["tool"]["setuptools"]
    assert setuptools["py-modules"] == ["fm_seg_config"]
    assert "mirage" in setuptools["packages"]["find"]["include"]
    assert (REPO / "fm_seg_config.py").is_file() and (REPO / "mirage/__init__.py").is_file()
    # dependencies come from requirements.txt (one list for pip -r and pip install .)
    assert setuptools["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert "dependencies" in PROJECT["project"]["dynamic"]


def test_eval_choices_match_the_evaluation_code():
    from mirage.cli import EMPTY_VOLUME_MODES
    from mirage.evaluate import EMPTY_VOLUME_MODES as checked
    assert EMPTY_VOLUME_MODES == checked


@pytest.mark.parametrize("script", ["run_seg_tuning.py", "run_seg_eval.py", "run_seg_report.py",
                                    "run_seg_predict.py", "run_seg_check_data.py",
                                    "run_seg_prepare_data.py", "runner"])
def test_help_does_not_import_torch(script):
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '-h']\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'cv2', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert "usage:" in result.stdout.lower()
    assert result.stdout.strip().splitlines()[-1] == "[]"
