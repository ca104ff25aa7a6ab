"""The pure core: backbones, patch features, memory-bank scoring (LDKNN and the KNN family),
DefectMaker, anomaly maps and metrics.

Nothing here imports Ray or MLflow, reads a dataset folder or writes a file format: everything
takes and returns arrays, tensors and settings objects, so it runs the same in a test, a notebook,
a Ray actor or a Ray Train worker. The layers above (`reb_dist.io`, `reb_dist.pipelines`,
`reb_dist.distributed`, `reb_dist.reporting`, `reb_dist.cli`) build on it; it imports none of them.
"""
