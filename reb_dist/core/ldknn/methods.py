"""A scoring method and its parameters (`ScoringMethod`), and the spec text that names one
("ldknn:k=5,alpha=0.5"): the one vocabulary the scorers, the formulas, tune, selection and export share."""

from __future__ import annotations

from dataclasses import dataclass, replace

METHODS = ("ldknn", "knn", "nn1", "kthnn", "lof", "ldof", "gde")


@dataclass(frozen=True)
class ScoringMethod:
    """A scoring method and its parameters: one of METHODS, K (unused by nn1 and gde), alpha (LDKNN
    only), squared or plain distances (L2, or Mahalanobis for gde)."""

    name: str
    k: int = 9
    alpha: float = 1.0
    squared: bool = True  # squared L2 as the authors' code (and faiss) use; False = plain L2
    # the anomaly map's own method (decoupled scoring); None: the map is this method's own (coupled)
    map: ScoringMethod | None = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown scoring method {self.name!r}; known: {', '.join(METHODS)}")
        if self.k < 1:
            raise ValueError(f"{self.name}: K must be >= 1, got {self.k}")
        if self.map is not None and self.map.map is not None:
            raise ValueError("a map method cannot have a map method of its own")

    @property
    def label(self) -> str:
        """The name results and MLflow use, e.g. "ldknn(k=9,alpha=1)", "knn(k=9)", "nn1", "gde", and
        "ldknn(k=40,alpha=1.7)+map:knn(k=9)" when the map is scored on its own."""
        if self.name in ("nn1", "gde"):
            own = self.name
        elif self.name == "ldknn":
            own = f"ldknn(k={self.k},alpha={self.alpha:g})"
        else:
            own = f"{self.name}(k={self.k})"
        return own if self.map is None else f"{own}+map:{self.map.label}"

    def with_params(self, k: int | None = None, alpha: float | None = None) -> ScoringMethod:
        """This method with another K and/or alpha (None: unchanged), checked as a new one; its map
        method, if any, is kept as it is."""
        return replace(self, k=self.k if k is None else k, alpha=self.alpha if alpha is None else alpha)

    @property
    def spec(self) -> str:
        """The spec text of this method alone (not its map) that `parse_method` reads back, e.g.
        "ldknn:k=9,alpha=0.1", "knn:k=4", "nn1" (what scoring.map_method and selection.json hold)."""
        if self.name in ("nn1", "gde"):
            return self.name
        return f"ldknn:k={self.k},alpha={self.alpha:g}" if self.name == "ldknn" else f"{self.name}:k={self.k}"

    @property
    def image(self) -> ScoringMethod:
        """The method of the image score alone (this method without its map part)."""
        return self if self.map is None else replace(self, map=None)

    @property
    def map_method(self) -> ScoringMethod:
        """The method the anomaly map is scored with (this method itself when coupled)."""
        return self.image if self.map is None else self.map

    @property
    def query_neighbours(self) -> int:
        """How many nearest bank points of each test patch the method (and its map) read (1 for gde,
        which reads none, so a max over methods stays a valid search K; see `needs_search`)."""
        own = 1 if self.name in ("nn1", "ldknn", "gde") else self.k
        return own if self.map is None else max(own, self.map.query_neighbours)

    @property
    def needs_search(self) -> bool:
        """Whether the method (or its map) reads a nearest-neighbour search of the test patches (all but gde)."""
        return self.name != "gde" or (self.map is not None and self.map.needs_search)


def parse_method(spec: str, k: int = 9, alpha: float = 1.0, squared: bool = True,
                 map_spec: str = "") -> ScoringMethod:
    """'ldknn' or 'ldknn:k=5,alpha=0.5' -> ScoringMethod, defaults from the run's settings; a
    non-empty `map_spec` (same form) gives the anomaly map its own method."""
    if map_spec.strip():
        own = parse_method(spec, k, alpha, squared)
        mapped = parse_method(map_spec, k, alpha, squared)
        return own if mapped == own else replace(own, map=mapped)
    name, _, params = spec.strip().partition(":")
    method = ScoringMethod(name.strip().lower(), k, alpha, squared)
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, _, value = item.partition("=")
        if key not in ("k", "alpha"):
            raise ValueError(f"{spec!r}: unknown parameter {key!r} (use k= or alpha=)")
        method = replace(method, **{key: int(value) if key == "k" else float(value)})
    return method
