"""Result tables: markdown for files and MLflow, aligned text for terminals, CSV.

Metrics are stored as fractions and shown as percentages (``scale=100``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _cells(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None, float_fmt: str, scale: float
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Formatted cell strings and, per column, whether it is numeric (right-aligned)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [True] * len(columns)
    body = []
    for r in rows:
        line = []
        for j, c in enumerate(columns):
            v = r.get(c)
            if isinstance(v, (float, np.floating)):
                line.append("-" if math.isnan(v) else float_fmt.format(float(v) * scale))
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                line.append(str(v))
            elif v is None:
                line.append("-")
            else:
                line.append(str(v))
                numeric[j] = False
        body.append(line)
    return list(columns), body, numeric


def results_table_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                           float_fmt: str = "{:.1f}", scale: float = 100) -> str:
    """GitHub markdown table; floats are multiplied by ``scale`` (metrics as %), ints kept as is.

    Missing or NaN values show as "-"; numeric columns are right-aligned. ``columns`` defaults
    to every key in order of first appearance.
    """
    cols, body, numeric = _cells(rows, columns, float_fmt, scale)

    def fmt(line: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in line) + " |"

    align = "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"
    lines = [fmt(cols), align, *map(fmt, body)]
    return "\n".join(lines) + "\n"


def results_table_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                       float_fmt: str = "{:.1f}", scale: float = 100) -> str:
    """Plain, space-aligned table for terminals and logs (same formatting as the markdown one)."""
    cols, body, numeric = _cells(rows, columns, float_fmt, scale)
    widths = [max(len(x) for x in col) for col in zip(cols, *body)]

    def fmt(line: list[str]) -> str:
        return "  ".join(s.rjust(w) if n else s.ljust(w) for s, w, n in zip(line, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cols), rule, *map(fmt, body)]) + "\n"


def leader_sentence(rows: Sequence[Mapping[str, Any]], metric: str = "image_auroc", float_fmt: str = "{:.1f}",
                    scale: float = 100) -> str:
    """One plain sentence of which method led on each category by `metric`, and by how much.

    Values are compared as the table shows them (``float_fmt`` of value x ``scale``), so methods the
    table shows equal are said to tie; missing or NaN values are left out. Categories keep their order
    of first appearance.
    """
    shown: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        v = r.get(metric)
        entries = shown.setdefault(str(r["category"]), [])
        if isinstance(v, (int, float, np.floating)) and not math.isnan(v):
            entries.append((str(r["method"]), float(float_fmt.format(float(v) * scale))))
    clauses = [_lead_clause(category, entries, float_fmt) for category, entries in shown.items()]
    if not clauses:
        return f"No {metric} to compare."
    name = " ".join(w.upper() if w in ("auroc", "aupro", "f1") else w for w in metric.split("_"))
    return f"By {name}, " + "; ".join(clauses) + "."


def _lead_clause(category: str, entries: list[tuple[str, float]], float_fmt: str) -> str:
    """'on pill a led with 89.4, 3.4 points ahead of b (86.0)', or the tie / single / none wording."""
    if not entries:
        return f"on {category} no method has a value"
    ranked = sorted(entries, key=lambda e: -e[1])
    best = ranked[0][1]
    leaders = [m for m, v in ranked if v == best]
    if len(ranked) == 1:
        return f"on {category} only {leaders[0]} was scored ({float_fmt.format(best)})"
    if len(leaders) == len(ranked):
        return f"on {category} {_and(leaders)} tied at {float_fmt.format(best)}"
    second = ranked[len(leaders)][1]
    runners = [m for m, v in ranked if v == second]
    lead = (f"{_and(leaders)} tied for the lead at" if len(leaders) > 1 else f"{leaders[0]} led with")
    return (f"on {category} {lead} {float_fmt.format(best)}, {float_fmt.format(best - second)} points "
            f"ahead of {_and(runners)} ({float_fmt.format(second)})")


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# the note under any table with a coreset-densities row: its figures are of another quantity
CORESET_NOTE = ("mode coreset-densities: densities are among coreset points, not the whole bank's (another "
                "quantity than the exact and faithful rows', not an approximation of it)")


def mode_footnote(rows: Sequence[Mapping[str, Any]], key: str = "mode") -> str:
    """The one footnote line a table needs for its rows' search modes ("" when none needs one):
    a coreset-densities row's densities are not the whole bank's, and a reader must not read them so."""
    return CORESET_NOTE if any(r.get(key) == "coreset-densities" for r in rows) else ""


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text (header + one line per row, values as given), quoted where a value needs it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buffer.getvalue()
