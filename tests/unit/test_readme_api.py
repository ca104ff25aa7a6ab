"""The README's Python API example runs as written (so it cannot go stale): its ```python block under
"## Python API", executed in a fresh working folder on the bundled sample."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow

README = Path(__file__).parents[2] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block of a README section."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = readme_block("## Python API")
    exec(compile(code, f"{README}:Python API", "exec"), {"__name__": "readme_example"})

    printed = capsys.readouterr().out
    lines = printed.splitlines()
    # four images, the three broken ones flagged and the good one not, at the calibrated threshold
    assert [line.split(":")[0] for line in lines[:4]] == ["000.png", "010.png", "019.png", "000.png"]
    assert [line.endswith("anomalous True") for line in lines[:4]] == [True, True, True, False]
    assert lines[4] == "(4, 256, 256)" and lines[5] == "(256, 256)"  # the sample's images are 256 px
    assert re.fullmatch(r"hottest patch \(\d+, \d+\) is nearest to .*/bottle/train/good/\d+\.png patch \(\d+, \d+\)",
                        lines[6]), lines[6]
    assert "'image_auroc': " in lines[7]
    assert (tmp_path / "models" / "bottle.safetensors").is_file()
    # `Model.fit` ran as `reb fit`: its MLflow run (./mlflow.db here) holds the pyfunc model
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id], "tags.command = 'fit'")
    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("bottle", run.info.run_id)]
