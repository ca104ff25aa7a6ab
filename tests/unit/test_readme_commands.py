"""Every `reb` command the README shows is run by a test, so none can crash or go stale unseen.

The commands are read from the README's ```bash blocks (continuation lines joined, comments dropped)
and run in README order, in a fresh folder, on the bundled sample: `/data/mvtec_ad` becomes the
sample's root, `new_images/` a folder of sample images, a `...` the sample's bottle. Commands that
need a Ray cluster (finetune, tune, sweep, sharded banks) only resolve their settings here
(`--print-config`, or loading the sweep file); tests/ray runs each of them for real (see RAY_RUN).
A README command that this file does not know how to run fails the test, so a new one cannot be
added without a test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA
from tests.unit.test_readme_api import readme_block

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# what a README placeholder stands for here
SUBSTITUTIONS = [
    ("/data/magnetic_tile --categories magnetic_tile", "sample --categories bottle"),
    ("/data/mvtec_ad", "sample"),
    ('"$PWD/', f'"{REPO}/'),
    (" jobs/", f" {REPO}/jobs/"),
    (" tune/", f" {REPO}/tune/"),
    ("reb fit ...", "reb fit --root sample --categories bottle"),
    ("reb benchmark ...", "reb benchmark --root sample --categories bottle"),
]
# at 128 px (a quarter of the sample's pixels: the test's time, not what runs, changes); predict and
# export take the model's size
SMALL = ["--set", "data.image_size=128"]
TAKES_SETTINGS = {"benchmark", "fit", "evaluate"}
# commands that need Ray: their settings are resolved here, the tests named run them on a real Ray
RAY_RUN = {
    "finetune": "tests/ray/test_finetune.py (reb finetune through the CLI, then a benchmark with the fine-tuned backbone)",
    "tune": "tests/ray/test_tune.py (reb tune, then fit --selection and predict)",
    "sweep": "tests/ray/test_jobs.py and tests/ray/test_sweep_cli.py (jobs/sample_sweep.yaml)",
    "shards": "tests/ray/test_sharded_bank.py (bank.shards on Ray actors)",
}


def readme_commands() -> list[str]:
    """Every `reb ...` command line of the README's ```bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("reb "):
                commands.append(" ".join(line.split()))
            elif " -- reb " in line:  # `ray job submit ... -- reb tune ...`
                commands.append(" ".join(line.split(" -- ", 1)[1].split()))
    return commands


def runnable(command: str) -> list[str]:
    for placeholder, value in SUBSTITUTIONS:
        command = command.replace(placeholder, value)
    return shlex.split(command)[1:]


def needs_ray(argv: list[str]) -> str | None:
    if argv[0] in ("finetune", "tune", "sweep"):
        return argv[0]
    if any(a.startswith("bank.shards=") for a in argv):
        return "shards"
    # what needs `reb finetune`'s or `reb tune`'s output
    if any(a.startswith("backbone.finetuned=") for a in argv):
        return "finetune"
    if "--selection" in argv:
        return "tune"
    return None


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A fresh working folder with `new_images/` (a few of the sample's pill test images) and
    `good_images/` (ten of its pill training images)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = tmp_path / "new_images"
    images.mkdir()
    for path in sorted((SAMPLE_DATA / "pill" / "test").rglob("*.png"))[::12]:
        (images / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    (images / "001.png").write_bytes((SAMPLE_DATA / "bottle" / "test" / "good" / "000.png").read_bytes())
    good = tmp_path / "good_images"  # a user's good images, no dataset layout
    good.mkdir()
    for path in sorted((SAMPLE_DATA / "pill" / "train" / "good").glob("*.png"))[:10]:
        (good / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_the_readme_shows_the_commands_this_test_runs():
    for where in RAY_RUN.values():
        for path in re.findall(r"tests/ray/\w+\.py", where):
            assert (REPO / path).is_file(), path
    commands = readme_commands()
    assert len(commands) >= 20  # the README's blocks were found
    kinds = {c.split()[1] for c in commands}
    assert {"benchmark", "fit", "evaluate", "predict", "export", "finetune", "tune", "sweep", "report",
            "cache"} <= kinds


def test_every_readme_command_runs_on_the_sample(readme_folder, capsys):
    ran, resolved = [], []
    for command in readme_commands():
        argv = runnable(command)
        ray = needs_ray(argv)
        if ray == "sweep":
            from reb_dist.distributed.sweep import Sweep

            flag = "--config" if "--config" in argv else "--sweep"
            assert Sweep.load(argv[argv.index(flag) + 1]).cells, command
            resolved.append(command)
            continue
        if ray:
            assert ray in RAY_RUN
            assert main(argv + SMALL + ["--print-config"]) == 0, command
            resolved.append(command)
            continue
        if argv[0] == "report" and not Path("outputs/sweeps/sample/mlflow.db").exists():
            # the README reports on the sweep's store; here, on the store the commands above logged to
            argv = ["report", "--tracking-uri", "sqlite:///mlflow.db", *argv[3:]]
        code = main(argv + (SMALL if argv[0] in TAKES_SETTINGS else []))
        assert code == 0, f"{command}\n{capsys.readouterr().err[-3000:]}"
        ran.append(command)

    # the Python blocks that use what the commands made: the exported file, the registered model
    # and the "## Layout" one (the "## Python API" block runs in tests/unit/test_readme_api.py)
    for heading in ("## Export", "## MLflow models", "## Layout"):
        code = readme_block(heading).replace('"jobs/', f'"{REPO}/jobs/')
        code = code.replace('"tracking.enabled=false"]', '"tracking.enabled=false", "data.image_size=128"]')
        namespace = {"__name__": "readme_example"}
        exec(compile(code, f"{README}:{heading}", "exec"), namespace)
        ran.append(heading)
        if heading == "## MLflow models":
            assert len(namespace["out"]["score"]) == 1  # its pyfunc scored its one image
    assert set(namespace["models"]) == {"bottle", "pill"}  # the Layout block fitted the job's classes

    kinds = {c.split()[1] for c in ran}
    assert {"benchmark", "fit", "evaluate", "predict", "export", "cache", "report"} <= kinds
    assert len(ran) >= 12 and len(resolved) >= 4
    # what the run ones left behind, as the README says
    assert Path("models/pill.safetensors").is_file() and Path("pill.onnx").is_file()
    assert Path("models/mine.safetensors").is_file()
    assert Path("predictions/scores.csv").is_file()
    assert Path("outputs/report/report.md").is_file()
