"""The latest results table, rendered from the bench (and parity) JSON files under profiling/results/.

    python -m flashdino.profiling.report                      # print the table
    python -m flashdino.profiling.report --readme README.md   # rewrite the table between the markers
    python -m flashdino.profiling.report --include-cpu        # also CPU (harness smoke) results

One row per (device, config label): the newest bench result. The README carries the table
between ``<!-- flashdino-results:begin -->`` and ``<!-- flashdino-results:end -->``; nothing in it
is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.realpath(__file__)), "results")
BEGIN, END = "<!-- flashdino-results:begin -->", "<!-- flashdino-results:end -->"


def find_results(results_dir: str, kind: str) -> List[Tuple[str, Dict[str, Any]]]:
    """(path, report) of every JSON file of `kind` below `results_dir`; unreadable files are reported."""
    found = []
    for root, _, files in os.walk(results_dir):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as fh:
                    report = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                print(f"flashdino report: skipping unreadable result '{path}': {exc}", file=sys.stderr)
                continue
            if isinstance(report, dict) and report.get("kind") == kind:
                found.append((path, report))
    return found


def _key(report: Dict[str, Any]) -> Tuple[str, str]:
    return report["meta"]["device"]["name"], report["config"]["label"]


def latest(reports: List[Tuple[str, Dict[str, Any]]], include_cpu: bool = False,
           key=_key) -> List[Tuple[str, Dict[str, Any]]]:
    """The newest report per `key` (default: device, config label), sorted by that key."""
    newest: Dict[Tuple[str, ...], Tuple[str, Dict[str, Any]]] = {}
    for path, report in reports:
        if not include_cpu and report["meta"]["device"].get("type") != "cuda":
            continue
        k = key(report)
        if k not in newest or report["meta"]["date"] > newest[k][1]["meta"]["date"]:
            newest[k] = (path, report)
    return [newest[k] for k in sorted(newest)]


def _num(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _mfu(side: Optional[Dict[str, Any]]) -> str:
    """Datasheet-peak MFU / measured-peak MFU (either may be absent: older results, CPU runs)."""
    if not side:
        return "n/a"
    sheet, measured = side.get("mfu_datasheet"), side.get("mfu_measured")
    if sheet is None or measured is None:
        return _pct(side.get("mfu"))
    return f"{_pct(sheet)} / {_pct(measured)}"


def _gib(side: Optional[Dict[str, Any]]) -> str:
    mib = (side or {}).get("peak_mem_mib", {}).get("allocated")
    return "n/a" if mib is None else f"{mib / 1024:.2f}"


def _parity_cell(p: Dict[str, Any]) -> str:
    if p["ok"]:
        return "pass"
    if p.get("first_failure_step") is not None:
        return f"FAIL (step {p['first_failure_step']})"
    if p.get("stopped_early"):
        return f"incomplete ({len(p['steps'])} of {p['workload']['steps']} steps, all within tolerance)"
    return "FAIL"


def _commit_cell(report: Dict[str, Any]) -> str:
    git = report["meta"]["git"]
    return (git.get("commit") or "?")[:8] + ("+" if git.get("dirty") else "")


def _variant_key(report: Dict[str, Any]) -> Tuple[str, str, str]:
    return _key(report) + (" ".join(report["variant"]["overrides"]),)


def _variant_table(results: List[Tuple[str, Dict[str, Any]]], include_cpu: bool) -> List[str]:
    """Rows of the engine-variant A/B runs (``flashdino bench --variant``), newest per
    (device, config, variant overrides)."""
    newest = latest(results, include_cpu, key=_variant_key)
    if not newest:
        return []
    lines = ["", "Engine variants measured against the engine in the same run (`flashdino bench --variant`):", "",
             "| device | config | variant | engine img/s | variant img/s | variant / engine | engine peak GiB "
             "| variant peak GiB | date | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for _, r in newest:
        device, label, overrides = _variant_key(r)
        eng, var = r["sides"].get("engine"), r["sides"]["variant"]
        ratio = r["variant"].get("speedup_vs_engine")
        lines.append(f"| {device} | {label} | `{overrides}` | {_num(eng and eng['images_per_s'], '.1f')} | "
                     f"{var['images_per_s']:.1f} | {_num(ratio, '.3f')}{'x' if ratio else ''} | {_gib(eng)} | {_gib(var)} | "
                     f"{r['meta']['date'][:10]} | {_commit_cell(r)} |")
    return lines


def latest_table(results_dir: str = DEFAULT_RESULTS, include_cpu: bool = False) -> str:
    """Markdown: engine vs reference per (device, config), newest result of each; then the
    engine-variant A/B runs, if any."""
    all_benches = find_results(results_dir, "flashdino.bench")
    # A variant run measures the engine against one of its options, not against the reference:
    # it has its own table and never replaces the engine-vs-reference row of the same config.
    variants = [(p, r) for p, r in all_benches if r.get("variant")]
    benches = latest([(p, r) for p, r in all_benches if not r.get("variant")], include_cpu)
    if not benches:
        where = "" if include_cpu else " (GPU)"
        return (f"No bench results{where} yet under `{os.path.relpath(results_dir)}`: run `flashdino bench --preset ...` "
                "on a GPU, then `python -m flashdino.profiling.report --readme README.md`.\n"
                + "".join(line + "\n" for line in _variant_table(variants, include_cpu)))
    parity = {_key(r): r for _, r in latest(find_results(results_dir, "flashdino.parity"), include_cpu)}
    lines = ["| device | config | workload | engine img/s | reference img/s | speedup | engine MFU | reference MFU "
             "| engine peak GiB | reference peak GiB | parity | date | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for path, r in benches:
        sides, w = r["sides"], r["workload"]
        eng, ref = sides.get("engine"), sides.get("reference")
        p = parity.get(_key(r))
        parity_cell = "-" if p is None else _parity_cell(p)
        lines.append(
            f"| {r['meta']['device']['name']} | {r['config']['label']} | {w['method']} {w['arch']}, batch {w['batch_size']}, "
            f"{w['precision']}, {w['data']} | {_num(eng and eng['images_per_s'], '.1f')} | "
            f"{_num(ref and ref['images_per_s'], '.1f')} | {_num(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} | "
            f"{_mfu(eng)} | {_mfu(ref)} | {_gib(eng)} | {_gib(ref)} | {parity_cell} | "
            f"{r['meta']['date'][:10]} | {_commit_cell(r)} |")
    basis = {r["peak"]["mfu_basis"] for _, r in benches}
    lines += ["", f"MFU: model FLOPs counted on the reference step / {' or '.join(sorted(basis))}; where two "
                  "figures are given, the second is against the bf16/fp16 matmul ceiling measured in the same run. "
                  "Generated by `python -m flashdino.profiling.report` from the JSON files in profiling/results/."]
    lines += _variant_table(variants, include_cpu)
    return "\n".join(lines) + "\n"


def update_readme(readme_path: str, table: str) -> bool:
    """Replace the text between the markers in `readme_path` with `table`; True when the file changed."""
    with open(readme_path) as fh:
        text = fh.read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"'{readme_path}' has no results block: add a line '{BEGIN}' and, below it, '{END}'")
    new = text[: start + len(BEGIN)] + "\n" + table + text[end:]
    if new == text:
        return False
    with open(readme_path, "w") as fh:
        fh.write(new)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="render the latest results table from profiling/results/")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="folder searched for bench/parity JSON files")
    parser.add_argument("--include-cpu", action="store_true", help="also list CPU runs (harness smoke tests)")
    parser.add_argument("--readme", help="rewrite the table between the results markers of this file")
    args = parser.parse_args(argv)
    table = latest_table(args.results, args.include_cpu)
    if args.readme:
        try:
            changed = update_readme(args.readme, table)
        except (OSError, ValueError) as exc:
            print(f"flashdino report: {exc}", file=sys.stderr)
            return 2
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}", file=sys.stderr)
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
