"""k-NN learning curve of a run: the weighted k-NN of the teacher at its step-numbered checkpoints.

A run keeps step-numbered checkpoints beside checkpoint.pth (``train.keep_checkpoints``; one is
written every ``train.checkpoint_every`` steps and at every epoch end). This command evaluates
every ``--every``-th of them, and always the last, with the protocol of ``flashdino eval knn``, and
writes ``knn_curve.json`` (with the date, device, versions, commit and command) and ``knn_curve.png``
in the run folder or ``--output``. The run's own baselines (random
init, raw pixels from ``knn_after_training.json``) are drawn as horizontal lines when present.

Examples:
  flashdino eval curve --run runs/demo_long-report
  flashdino eval curve --run runs/vitb16 --every 5 --data /data/imagenet --k 20
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence, Tuple

from flashdino.engine.checkpoint import step_checkpoints

from .callbacks import KNN_FILE
from .cli_common import AMP_DTYPES, check_positive, fail, resolve_device, user_errors, write_json

CURVE_JSON, CURVE_PNG = "knn_curve.json", "knn_curve.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a flashdino train output folder with checkpoint_step*.pth files")
    parser.add_argument("--every", type=int, default=1, help="evaluate every N-th checkpoint (the last always)")
    parser.add_argument("--k", type=int, default=None, help="neighbours (default: the run's eval.knn_k)")
    parser.add_argument("--data", help="Fashion-MNIST folder, or a root with train/ and val/ (default: the run's data)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per feature-extraction batch")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="folder for knn_curve.json / .png (default: the run folder), e.g. profiling/results/...")
    parser.add_argument("--precision", default="fp32", choices=tuple(AMP_DTYPES),
                        help="feature extraction precision: fp32 (v1 protocol) or autocast fp16/bf16 (v2 protocol)")


def select(checkpoints: Sequence[Tuple[int, str]], every: int) -> List[Tuple[int, str]]:
    """Every `every`-th checkpoint counted from the first, plus the last."""
    chosen = list(checkpoints[::every])
    if checkpoints and chosen[-1] != checkpoints[-1]:
        chosen.append(checkpoints[-1])
    return chosen


def run(args) -> Dict[str, object]:
    from .backbone import load_backbone
    from .data import resolve_eval_data
    from .features import EvalTransform
    from .knn import evaluate_knn

    check_positive(every=args.every, batch_size=args.batch_size)
    if not os.path.isdir(args.run):
        raise FileNotFoundError(f"run folder '{args.run}' does not exist")
    checkpoints = step_checkpoints(args.run)
    if not checkpoints:
        raise FileNotFoundError(f"'{args.run}' holds no checkpoint_step*.pth; train with train.keep_checkpoints > 0")
    device = resolve_device(args.device)
    points, cfg = [], None
    for step, path in select(checkpoints, args.every):
        backbone, checkpoint_cfg, _ = load_backbone(path, "teacher", device)
        if cfg is None:  # the evaluation set and protocol: the run's config, read once
            cfg = checkpoint_cfg
            train, test, description = resolve_eval_data(cfg, args.data)
            transform = EvalTransform.from_config(cfg)
            k, temperature = args.k or cfg.eval.knn_k, cfg.eval.knn_temperature
        result = evaluate_knn(backbone, train, test, transform, ks=[k], temperature=temperature,
                              batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                              amp_dtype=AMP_DTYPES[args.precision])
        acc = result["knn"][k]
        points.append({"step": step, "top1": acc["top1"], "top5": acc["top5"], "checkpoint": path})
        print(f"step {step:>7}  top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%", flush=True)
    from flashdino.profiling.env import run_metadata

    record = {"kind": "flashdino.knn_curve", "meta": run_metadata(device), "run": args.run, "data": description,
              "k": k, "temperature": temperature, "points": points, "baselines": _run_baselines(args.run, k)}
    out = args.output or args.run
    write_json(os.path.join(out, CURVE_JSON), record)
    record["plot"] = _plot(record, os.path.join(out, CURVE_PNG))
    record["output"] = out
    return record


def _run_baselines(run_dir: str, k: int) -> Dict[str, float]:
    """Top-1 of the baselines the run measured after training (random init, raw pixels), if any."""
    path = os.path.join(run_dir, KNN_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        results = json.load(fh).get("results", {})
    return {name: res["knn"][str(k)]["top1"] for name, res in results.items()
            if name != "trained" and str(k) in res.get("knn", {})}


def _plot(record: Dict[str, object], path: str):
    from flashdino.engine.plots import PlotsUnavailable, plot_knn_curve

    try:
        return plot_knn_curve(record, path)
    except PlotsUnavailable as exc:
        print(f"[flashdino] {exc}")
        return None


def main(args) -> int:
    try:
        record = run(args)
    except user_errors() as exc:
        return fail(str(exc))
    print(f"results: {os.path.join(record['output'], CURVE_JSON)}" + (f", {record['plot']}" if record["plot"] else ""))
    return 0
