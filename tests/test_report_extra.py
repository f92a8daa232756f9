"""`fl-sparse report` without the `report` extra: one line naming the extra, exit 2, nothing read or written."""

import subprocess
import sys

# matplotlib made unimportable the way a missing package is: `import matplotlib` raises ImportError.
WITHOUT_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; from fl_sparse.cli.main import main; "
                      "sys.exit(main(sys.argv[1:]))")


def test_report_without_matplotlib_names_the_report_extra(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, "report", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fl-sparse: error: fl-sparse report draws its plots with matplotlib, which is not installed: "
        "pip install 'fl-sparse[report]'"], done.stderr
    assert list(tmp_path.iterdir()) == []  # no out/ directory, and no mlflow.db opened into existence


def test_report_extra_carries_matplotlib():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("matplotlib") for req in project["optional-dependencies"]["report"])
    assert not any(req.startswith("matplotlib") for req in project["dependencies"])
