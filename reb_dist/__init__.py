"""reb-dist: REB (DefectMaker + LDKNN) anomaly detection, benchmarking and tuning on Ray."""

__version__ = "0.1.0"
