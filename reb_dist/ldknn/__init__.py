"""Memory-bank anomaly scoring (pure: numpy + faiss, no Ray, no files)."""

from .bank_stats import BankStats, to_distance
from .coreset import greedy_coreset
from .scorers import METHODS, BankScorer, ScoringMethod, parse_method
from .search import BankIndex

__all__ = ["METHODS", "BankIndex", "BankScorer", "BankStats", "ScoringMethod", "greedy_coreset",
           "parse_method", "to_distance"]
