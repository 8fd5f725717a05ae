"""Run the embedded default (``flashdino train``) as a user would, time it, and write a results file.

    python -m flashdino.engine.eval.demo_report [--preset demo] [--results profiling/results/demo] [key=value ...]

The training command runs in a child process exactly as printed in the report; wall time, the CPU
time it used (all its processes) and the load average before and after (other processes sharing
the machine slow a run down) are recorded beside the k-NN accuracies of the trained teacher and of
the two same-run baselines (random init, raw pixels). Output: ``<results>/<preset>-<device>-<date>.json``
(``"kind": "flashdino.demo"``) and ``.md``, with the device, library versions and git commit (``flashdino.profiling.env``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from typing import Dict, List

from flashdino.engine.eval.callbacks import KNN_FILE

BUDGET_SECONDS = {"cpu": 15 * 60}  # the demo's promise on a 2-core CPU (issue 3)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(preset: str, output_dir: str, overrides: List[str]) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "flashdino.engine.cli", "train", "--output-dir", output_dir]
    if preset != "demo":
        cmd += ["--preset", preset]
    cmd += overrides
    from flashdino.profiling.env import git_info

    git = git_info()  # the code the run starts with (the checkout may move on while it trains)
    load_before = os.getloadavg()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    # The child writes straight into files, so a run stopped from outside (a deadline) leaves its
    # output behind instead of losing what a pipe held.
    out_path, err_path = os.path.join(output_dir, "demo_stdout.txt"), os.path.join(output_dir, "demo_stderr.txt")
    with open(out_path, "w") as out_fh, open(err_path, "w") as err_fh:
        returncode = subprocess.run(cmd, stdout=out_fh, stderr=err_fh, text=True).returncode
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    with open(out_path) as fh:
        stdout = fh.read()
    with open(err_path) as fh:
        stderr = fh.read()
    if returncode != 0:
        raise RuntimeError(f"the demo failed (exit {returncode}); its stderr ({err_path}) ends with:\n{stderr[-3000:]}")
    summary = _last_json_line(stderr)
    with open(os.path.join(output_dir, KNN_FILE)) as fh:
        knn = json.load(fh)
    # "flashdino train" is what a user types; the child ran the same entry point via python -m.
    user_cmd = "flashdino train " + " ".join(shlex.quote(a) for a in cmd[cmd.index("train") + 1:])
    return {"command": user_cmd, "git": git, "wall_seconds": wall, "cpu_seconds": cpu, "load_before": load_before,
            "load_after": os.getloadavg(), "summary": summary, "knn": knn, "stdout": stdout}


def _last_json_line(text: str) -> Dict[str, object]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def _fit_note(fit) -> str:
    """The training line's note on train.fit_to_time, when it shortened the schedule."""
    if not fit or fit["fitted_epochs"] >= fit["planned_epochs"]:
        return ""
    drift = fit.get("max_change_of_past_values") or {}
    return (f"; schedule **fitted to the time budget**: {fit['fitted_epochs']} of {fit['planned_epochs']} planned epochs "
            f"(speed {fit['seconds_per_step'] * 1e3:.1f} ms/step measured at step {fit['at_step']}; the steps before "
            "used the longer schedule's values, at most " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(drift.items()))
            + " away)")


def write_report(result: Dict[str, object], results_dir: str, preset: str) -> List[str]:
    import torch

    from flashdino.profiling.env import describe, run_metadata

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = run_metadata(device, command=result["command"])
    if result.get("git"):
        meta["git"] = result["git"]
    knn = result["knn"]
    k = str(knn["ks"][0])
    acc = {name: res["knn"][k] for name, res in knn["results"].items()}
    summary = result["summary"]
    budget = BUDGET_SECONDS.get(device.type) if preset == "demo" else None  # the promise is the demo's alone
    verdict = {
        "beats_random_init": acc["trained"]["top1"] > acc["random_init"]["top1"],
        "beats_raw_pixels": "raw_pixels" in acc and acc["trained"]["top1"] > acc["raw_pixels"]["top1"],
        "within_budget": None if budget is None else result["wall_seconds"] <= budget,
    }
    record = {"kind": "flashdino.demo", "meta": meta, "preset": preset, "wall_seconds": result["wall_seconds"],
              "cpu_seconds": result["cpu_seconds"], "load_before": result["load_before"],
              "load_after": result["load_after"], "budget_seconds": budget, "verdict": verdict,
              "train": {k2: summary.get(k2) for k2 in ("steps", "planned_steps", "stopped_early", "schedule_fit", "epochs",
                                                       "images_seen", "train_seconds", "eval_seconds", "collapse")},
              "knn": {"k": int(k), "temperature": knn["temperature"], "data": knn["data"], "top1_top5": acc,
                      "seconds": knn.get("seconds")}}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    base = os.path.join(results_dir, f"{preset}-{device.type}-{stamp}")
    os.makedirs(results_dir, exist_ok=True)
    with open(base + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    names = {"trained": "this run (teacher)", "random_init": "same network, random init", "raw_pixels": "raw pixels"}
    lines = [f"# Embedded default (`{preset}` preset): results", ""] + describe(meta) + [
        f"- wall time of the whole command (training + evaluation + plots): **{result['wall_seconds'] / 60:.1f} min** "
        f"({result['wall_seconds']:.0f} s); CPU time of its processes {result['cpu_seconds']:.0f} s",
        f"- load average before / after: {result['load_before'][0]:.2f} / {result['load_after'][0]:.2f} "
        f"(on {os.cpu_count()} logical CPUs; the run itself adds about 2 to the 1-minute figure, anything beyond "
        f"that is other processes sharing the machine)",
        f"- training: {summary.get('steps')} steps, {float(summary.get('epochs') or 0):.2f} epochs, "
        f"{summary.get('images_seen')} images in {float(summary.get('train_seconds') or 0):.0f} s; "
        f"evaluation {float(summary.get('eval_seconds') or 0):.0f} s"
        + (f"; **stopped early**: {summary['stopped_early']}" if summary.get("stopped_early") else "")
        + _fit_note(summary.get("schedule_fit")),
        "", f"Weighted {k}-NN (T = {knn['temperature']}, cosine, L2-normalized features), {knn['data']}:", "",
        "| features | top-1 | top-5 |", "|---|---|---|",
    ]
    for name, label in names.items():
        if name in acc:
            lines.append(f"| {label} | {acc[name]['top1']:.2f}% | {acc[name]['top5']:.2f}% |")
    lines += ["", f"- beats the random-init network: **{'yes' if verdict['beats_random_init'] else 'NO'}**",
              f"- beats raw pixels: {'yes' if verdict['beats_raw_pixels'] else 'no'}"]
    if budget is not None:
        lines.append(f"- within the {budget / 60:.0f}-minute budget: **{'yes' if verdict['within_budget'] else 'NO'}**")
    lines += ["", "Run summary as printed:", "", "```", result["stdout"].strip(), "```", ""]
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines))
    return [base + ".json", base + ".md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--results", default="profiling/results/demo", help="folder for the results files")
    parser.add_argument("--output-dir", help="the run's folder (default: runs/<preset>-report-<time>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    output = args.output_dir or os.path.join("runs", f"{args.preset}-report-{dt.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(output, exist_ok=True)
    result = run_demo(args.preset, output, args.overrides)
    for path in write_report(result, args.results, args.preset):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
