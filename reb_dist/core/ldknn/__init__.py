"""Memory-bank anomaly scoring (pure: numpy + faiss, no Ray, no files)."""

from reb_dist.core.ldknn.bank_stats import BankStats, to_distance
from reb_dist.core.ldknn.coreset import (CORESET_METHODS, select_coreset, coverage_radius, fast_greedy_coreset,
                                         greedy_coreset, random_coreset)
from reb_dist.core.ldknn.methods import METHODS, ScoringMethod, parse_method
from reb_dist.core.ldknn.scorers import BankScorer
from reb_dist.core.ldknn.index import Index, IndexFactory
from reb_dist.core.ldknn.search import BankIndex

__all__ = ["CORESET_METHODS", "METHODS", "BankIndex", "Index", "IndexFactory", "BankScorer", "BankStats",
           "ScoringMethod", "select_coreset", "coverage_radius", "fast_greedy_coreset", "greedy_coreset", "parse_method",
           "random_coreset", "to_distance"]
