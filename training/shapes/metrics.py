"""Counting for `mumu eval`: Wilson 95 % intervals, chance levels, the results table.

Every figure is a proportion k/n of independent trials (one generated image per prompt), so its
interval is Wilson's score interval, which stays inside [0, 1] and is honest at small n and at
proportions near 0 or 1 (unlike the normal approximation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .world import COLOUR_NAMES, FLOOR_NAMES, PATTERNS

Z95 = 1.959963984540054

CHANCE = {
    "colour": 1.0 / len(COLOUR_NAMES),    # 1/8
    "pattern": 1.0 / len(PATTERNS),       # 1/3
    "floor": 1.0 / len(FLOOR_NAMES),      # 1/4
}


def both_right_chance(n_objects: list[int] | int) -> float:
    """Chance that every object's colour is right: (1/8)^k, averaged over the prompts' object counts."""
    ks = [n_objects] if isinstance(n_objects, int) else list(n_objects)
    if not ks:
        return float("nan")
    return sum(CHANCE["colour"] ** k for k in ks) / len(ks)


@dataclass
class Proportion:
    k: int
    n: int

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.ci
        return {"k": self.k, "n": self.n, "p": _r(self.p), "lo": _r(lo), "hi": _r(hi)}

    def fmt(self, ci: bool = True) -> str:
        if not self.n:
            return "-"
        if not ci:
            return f"{100 * self.p:5.1f}"
        lo, hi = self.ci
        return f"{100 * self.p:5.1f} [{100 * lo:4.1f},{100 * hi:5.1f}]"


def _r(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (nan, nan when n == 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n; got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact ends at k = 0 / k = n (rounding otherwise leaves 1e-17 off)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def inside_interval(value: float, prop: Proportion) -> bool:
    lo, hi = prop.ci
    return lo <= value <= hi


COLUMNS = (("condition", 34), ("colour/obj [95% CI]", 21), ("all right [95% CI]", 21), ("pattern", 7),
           ("presence", 8), ("floor", 6), ("chance c/all", 13), ("n", 5))


def format_table(rows: list[dict]) -> str:
    """rows: {name, colour, all_right, pattern, presence, floor (Proportion or None), chance_all, n}."""
    head = "  ".join(f"{title:<{w}}" for title, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [
            r["name"][:34],
            r["colour"].fmt() if r.get("colour") else "-",
            r["all_right"].fmt() if r.get("all_right") else "-",
            r["pattern"].fmt(ci=False) if r.get("pattern") else "-",
            r["presence"].fmt(ci=False) if r.get("presence") else "-",
            r["floor"].fmt(ci=False) if r.get("floor") else "-",
            f"{100 * CHANCE['colour']:.1f}/{100 * r['chance_all']:.1f}" if r.get("chance_all") is not None else "-",
            str(r.get("n", "")),
        ]
        lines.append("  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, COLUMNS)))
    return "\n".join(lines)
