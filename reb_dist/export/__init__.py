"""Export a fitted model to one TorchScript or ONNX file, and score images with that file alone.

- `module`: `ExportedDetector`, the pure torch module (normalisation, backbone, aggregation, bank,
  exact nearest-neighbour search, densities, image score, blurred map, calibration).
- `build`: a `Detector` -> that module, and the metadata a runtime needs.
- `writer`: `export_model(model_file, "onnx" | "torchscript", output)` (`reb export`).
- `runtime`: `load_exported(file).score_files(paths)` with onnxruntime or torch.jit.load; imports no
  backbone weights, timm, faiss, Ray or MLflow (nor torch, for ONNX).
- `predict`: `reb predict -m file.onnx|file.pt`: overlays and scores.csv through the runtime.

Nothing is imported here, so `import reb_dist.export.runtime` stays light.
"""
