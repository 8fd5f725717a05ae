"""Weighted k-NN evaluation of a checkpoint's teacher backbone (spec 5.1 / 5.2).

Features: the CLS token after the final LayerNorm, L2-normalized. Each evaluation image's k
nearest train images (cosine similarity) vote with weight exp(sim / T); top-1 and top-5 accuracy.
Features are streamed into one buffer (or .npy memory maps with --feature-dir) and the similarity
search is chunked, so ImageNet-scale sets fit in memory.

Examples:
  flashdino eval knn --checkpoint runs/demo/checkpoint.pth                       # Fashion-MNIST test split
  flashdino eval knn --checkpoint ckpt.pth --data /data/imagenet --k 10 20 100 200
  flashdino eval knn --checkpoint ckpt.pth --train-data train_dir --val-data val_dir --baselines
"""
from __future__ import annotations

import argparse

from .cli_common import (AMP_DTYPES, add_common_arguments, check_positive, default_output, fail, resolve_device,
                         user_errors, write_json)
from .knn import KNN_TEMPERATURE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="neighbour counts (default: the run's eval.knn_k, 20); e.g. --k 10 20 100 200")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"vote temperature T (default: the run's eval.knn_temperature, {KNN_TEMPERATURE})")
    parser.add_argument("--query-chunk", type=int, default=1024, help="evaluation rows per similarity block")
    parser.add_argument("--train-chunk", type=int, default=65536, help="train rows per similarity block")
    parser.add_argument("--feature-dir", help="keep the features as .npy memory maps in this folder (large sets)")
    parser.add_argument("--baselines", action="store_true",
                        help="also evaluate the same architecture at random initialization, and raw pixels for "
                             "small images (<= 64 px)")


def main(args) -> int:
    try:
        record = run(args)
    except user_errors() as exc:
        return fail(str(exc))
    print(format_table(record))
    print(f"results: {record['output']}")
    return 0


def run(args) -> dict:
    from .backbone import load_backbone, random_init_backbone
    from .data import resolve_eval_data
    from .features import EvalTransform
    from .knn import evaluate_knn, raw_pixel_knn

    check_positive(batch_size=args.batch_size, query_chunk=args.query_chunk, train_chunk=args.train_chunk,
                   eval_size=args.eval_size, resize_size=args.resize_size)
    device = resolve_device(args.device)
    backbone, cfg, info = load_backbone(args.checkpoint, args.which, device)
    ks = args.k or [cfg.eval.knn_k]
    temperature = args.temperature if args.temperature is not None else cfg.eval.knn_temperature
    precision = args.precision or "fp32"
    train, test, description = resolve_eval_data(cfg, args.data, args.train_data, args.val_data)
    transform = EvalTransform.from_config(cfg, args.eval_size, args.resize_size)
    common = dict(ks=ks, temperature=temperature, batch_size=args.batch_size, num_workers=args.num_workers,
                  device=device, amp_dtype=AMP_DTYPES[precision], query_chunk=args.query_chunk,
                  train_chunk=args.train_chunk, progress=True)
    results = {"trained": evaluate_knn(backbone, train, test, transform, feature_dir=args.feature_dir, **common)}
    if args.baselines:
        results["random_init"] = evaluate_knn(random_init_backbone(cfg, device), train, test, transform, **common)
        if transform.size <= 64:
            results["raw_pixels"] = raw_pixel_knn(train, test, transform, ks=ks, temperature=temperature,
                                                  query_chunk=args.query_chunk, train_chunk=args.train_chunk)
    output = args.output or default_output(args.checkpoint, "knn", args.which)
    record = {
        "checkpoint": info, "data": description, "transform": repr(transform), "ks": ks,
        "temperature": temperature, "precision": precision, "results": results, "output": output,
    }
    write_json(output, record)
    return record


def format_table(record: dict) -> str:
    """A small text table: one row per (features, k)."""
    lines = [f"weighted k-NN (T = {record['temperature']}) on {record['data']}",
             f"{'features':<14}{'k':>5}{'top-1':>9}{'top-5':>9}"]
    for name, res in record["results"].items():
        for k, acc in sorted(res["knn"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"{name:<14}{k:>5}{acc['top1']:>8.2f}%{acc['top5']:>8.2f}%")
    return "\n".join(lines)
