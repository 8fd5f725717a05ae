"""Regression guard: compare a new bench JSON with a stored baseline; flag a drop of more than 5%.

Guarded (engine side): images/s and MFU must not drop, peak memory must not grow, by more than
the threshold. Two results are only comparable when they ran the same device, config hash and
data mode; otherwise the comparison is refused (exit 2) unless ``allow_mismatch`` is set.

    python -m flashdino.profiling.regression NEW.json BASELINE.json [--threshold 0.05]
    flashdino bench ... --baseline BASELINE.json            # run, then compare
    flashdino bench --compare NEW.json --baseline BASELINE.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

# (label, path into the bench JSON, +1 higher is better / -1 lower is better)
GUARDED = [
    ("engine images/s", ("sides", "engine", "images_per_s"), +1),
    ("engine MFU", ("sides", "engine", "mfu"), +1),
    ("engine peak memory (MiB)", ("sides", "engine", "peak_mem_mib", "allocated"), -1),
]
INFORMATIONAL = [
    ("engine step time median (ms)", ("sides", "engine", "step_ms", "median"), -1),
    ("reference images/s", ("sides", "reference", "images_per_s"), +1),
    ("speedup vs reference", ("speedup",), +1),
]


class IncomparableResults(ValueError):
    """The two bench results ran different workloads or devices."""


def _lookup(report: Dict[str, Any], path) -> Optional[float]:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _identity(report: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "device": report.get("meta", {}).get("device", {}).get("name"),
        "config_hash": report.get("config", {}).get("hash"),
        "data": report.get("workload", {}).get("data"),
    }


def load(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            report = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"bench result '{path}' does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"bench result '{path}' is not valid JSON: {exc}") from None
    if report.get("kind") != "flashdino.bench":
        raise ValueError(f"'{path}' is not a flashdino bench result (kind={report.get('kind')!r})")
    return report


def compare(new: Dict[str, Any], baseline: Dict[str, Any], threshold: float = 0.05,
            allow_mismatch: bool = False) -> Dict[str, Any]:
    """{"ok", "regressions", "checks", "identity", "threshold"}; raises IncomparableResults."""
    if not 0 < threshold < 1:
        raise ValueError(f"regression threshold must be in (0, 1), got {threshold}")
    ident_new, ident_base = _identity(new), _identity(baseline)
    mismatched = {k: [ident_base[k], ident_new[k]] for k in ident_new if ident_new[k] != ident_base[k]}
    if mismatched and not allow_mismatch:
        detail = "; ".join(f"{k}: baseline {a!r} vs new {b!r}" for k, a, b in ((k, *v) for k, v in mismatched.items()))
        raise IncomparableResults(f"bench results are not comparable ({detail}); pass --allow-mismatch to compare anyway")
    checks: List[Dict[str, Any]] = []
    for guarded, table in ((True, GUARDED), (False, INFORMATIONAL)):
        for label, path, direction in table:
            base, now = _lookup(baseline, path), _lookup(new, path)
            row: Dict[str, Any] = {"metric": label, "baseline": base, "new": now, "guarded": guarded,
                                   "change": None, "regressed": False}
            if base is not None and now is not None and base != 0:
                change = (now - base) / abs(base)
                row["change"] = change
                row["regressed"] = guarded and direction * change < -threshold
            elif guarded:
                row["note"] = "missing in one of the results: not compared"
            checks.append(row)
    regressions = [c["metric"] for c in checks if c["regressed"]]
    return {"ok": not regressions, "regressions": regressions, "checks": checks, "threshold": threshold,
            "mismatched": mismatched}


def to_markdown(result: Dict[str, Any]) -> str:
    lines = [f"Regression guard (threshold {100 * result['threshold']:.0f}%): "
             + ("no regression" if result["ok"] else "REGRESSION in " + ", ".join(result["regressions"])), "",
             "| metric | baseline | new | change | status |", "|---|---:|---:|---:|---|"]
    for c in result["checks"]:
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        change = "n/a" if c["change"] is None else f"{100 * c['change']:+.1f}%"
        status = "REGRESSED" if c["regressed"] else ("ok" if c["guarded"] else "info")
        if c.get("note"):
            status += f" ({c['note']})"
        lines.append(f"| {c['metric']} | {fmt(c['baseline'])} | {fmt(c['new'])} | {change} | {status} |")
    if result["mismatched"]:
        lines += ["", "Compared despite differences: " + ", ".join(result["mismatched"])]
    return "\n".join(lines) + "\n"


def check_files(new_path: str, baseline_path: str, threshold: float = 0.05, allow_mismatch: bool = False) -> int:
    """Print the comparison; 0 = no regression, 1 = regression, 2 = results not comparable/unreadable."""
    try:
        result = compare(load(new_path), load(baseline_path), threshold, allow_mismatch)
    except (IncomparableResults, ValueError, FileNotFoundError) as exc:
        print(f"flashdino regression guard: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(result))
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compare a bench JSON with a baseline; exit 1 on a regression")
    parser.add_argument("new")
    parser.add_argument("baseline")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative drop that counts as a regression")
    parser.add_argument("--allow-mismatch", action="store_true", help="compare results of different devices/configs")
    args = parser.parse_args(argv)
    return check_files(args.new, args.baseline, args.threshold, args.allow_mismatch)


if __name__ == "__main__":
    sys.exit(main())
