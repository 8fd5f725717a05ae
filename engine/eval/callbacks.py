"""What a ``flashdino train`` run does besides training: diagnostics, evaluation, plots, a summary.

``build_callbacks(cfg)`` returns, in order:

* :class:`~flashdino.engine.diagnostics.CollapseMonitor` (``log.collapse_check``): effective rank and
  per-dimension std of the teacher's outputs at each log step, with a warning toward collapse;
* :class:`KnnAfterTraining` (``eval.after_train``): weighted k-NN of the teacher on the held-out split,
  beside two baselines measured in the same run: the same network at its initialization and
  (for small images) raw pixels; written to ``knn_after_training.json``;
* :class:`EndOfRunPlots` (``log.plots``): ``loss_curves.png`` and ``attention_maps.png``;
* :class:`RunSummary`: the one-screen summary.

The trainer calls ``on_log(trainer, step, metrics, losses)`` at log steps and
``on_train_end(trainer, summary)`` once; the end-of-run callbacks add their results to `summary`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional

from flashdino.engine.diagnostics import CollapseMonitor

RAW_PIXEL_MAX_SIZE = 64  # the raw-pixel baseline is only meaningful (and cheap) for small images
ATTENTION_IMAGES = 6
# Not eval_knn.json: that is what `flashdino eval knn` writes beside the checkpoint.
KNN_FILE = "knn_after_training.json"


def _is_main() -> bool:
    from flashdino.engine.distributed import is_main_process

    return is_main_process()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class KnnAfterTraining:
    """Weighted k-NN of the trained teacher, of the same network at initialization and of raw pixels.

    The evaluation data is located when the callback is built, before training starts, so a
    missing dataset is reported at once rather than after a long run."""

    def __init__(self, cfg):
        from flashdino.pipelines.datasets import DatasetError

        from .data import resolve_eval_data
        from .features import EvalTransform

        self.cfg = cfg
        try:
            self.train_reader, self.test_reader, self.description = resolve_eval_data(cfg)
        except (DatasetError, FileNotFoundError) as exc:
            raise DatasetError(f"{exc} (the k-NN evaluation after training needs its held-out split; "
                               "eval.after_train=false skips that evaluation)") from exc
        self.transform = EvalTransform.from_config(cfg)
        self.ks = [cfg.eval.knn_k]

    def on_train_end(self, trainer, summary: Dict[str, object]) -> None:
        teacher = trainer.teacher_backbone_for_eval()  # collective under DeepSpeed: before the rank check
        if not _is_main():
            return
        from .backbone import random_init_backbone
        from .knn import evaluate_knn, raw_pixel_knn

        cfg, device = self.cfg, trainer.device
        t0 = time.perf_counter()
        common = dict(ks=self.ks, temperature=cfg.eval.knn_temperature, batch_size=512, device=device,
                      num_workers=min(cfg.data.num_workers, 8), progress=True)
        _say(f"[flashdino] k-NN evaluation on {self.description}: {len(self.train_reader)} train / "
             f"{len(self.test_reader)} evaluation images; baselines: random init, raw pixels")
        results = {"trained": evaluate_knn(teacher, self.train_reader, self.test_reader, self.transform, **common)}
        results["random_init"] = evaluate_knn(random_init_backbone(cfg, device), self.train_reader, self.test_reader,
                                              self.transform, **common)
        if self.transform.size <= RAW_PIXEL_MAX_SIZE:
            results["raw_pixels"] = raw_pixel_knn(self.train_reader, self.test_reader, self.transform, ks=self.ks,
                                                  temperature=cfg.eval.knn_temperature, device=device)
        record = {"data": self.description, "transform": repr(self.transform), "ks": self.ks,
                  "temperature": cfg.eval.knn_temperature, "step": summary.get("steps"), "results": results,
                  "seconds": time.perf_counter() - t0}
        path = os.path.join(trainer.output_dir, KNN_FILE)
        with open(path, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
        summary["knn"] = {name: {str(k): v for k, v in res["knn"].items()} for name, res in results.items()}
        summary["knn_data"] = self.description
        summary["knn_file"] = path
        summary["eval_seconds"] = record["seconds"]


class EndOfRunPlots:
    """``loss_curves.png`` from the run's metrics.jsonl and ``attention_maps.png`` of a few images."""

    def __init__(self, cfg, images_reader=None):
        self.cfg = cfg
        self.images_reader = images_reader

    def on_train_end(self, trainer, summary: Dict[str, object]) -> None:
        teacher = trainer.teacher_backbone_for_eval()  # collective under DeepSpeed: before the rank check
        if not _is_main():
            return
        from flashdino.engine import plots
        from flashdino.engine.metrics import read_jsonl

        from .features import EvalTransform

        out = trainer.output_dir
        written, problems = [], []
        try:
            jsonl = os.path.join(out, "metrics.jsonl")
            if os.path.isfile(jsonl):
                written.append(plots.plot_loss_curves(read_jsonl(jsonl), os.path.join(out, "loss_curves.png"),
                                                      title=f"{self.cfg.objective.method} - {out}"))
            else:
                problems.append("no metrics.jsonl (log.jsonl=false): loss curves skipped")
            reader = self.images_reader or trainer.image_reader
            transform = EvalTransform.from_config(self.cfg, self.cfg.model.img_size, self.cfg.model.img_size)
            images = plots.load_images(reader, plots.pick_images(reader, ATTENTION_IMAGES), transform)
            written.append(plots.plot_attention_maps(
                teacher, images, os.path.join(out, "attention_maps.png"),
                self.cfg.crops.mean, self.cfg.crops.std, title="teacher: last-layer CLS attention"))
        except plots.PlotsUnavailable as exc:
            problems.append(str(exc))
        except Exception as exc:  # a plot must never lose a finished run; say what went wrong
            problems.append(f"plotting failed: {type(exc).__name__}: {exc}")
        for p in problems:
            _say(f"[flashdino] {p}")
        summary["plots"] = written


class RunSummary:
    """Prints the one-screen summary of the run (after the other end-of-run callbacks)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.first_metrics: Optional[Dict[str, float]] = None

    def on_log(self, trainer, step, metrics, losses=None) -> None:
        if self.first_metrics is None:
            self.first_metrics = dict(metrics)

    def on_train_end(self, trainer, summary: Dict[str, object]) -> None:
        if _is_main():
            print(format_summary(self.cfg, trainer, summary, self.first_metrics), flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _losses(metrics: Optional[Dict[str, float]]) -> str:
    if not metrics:
        return "-"
    keys = [k for k in metrics if k.endswith("_loss")]
    keys.sort(key=lambda k: (k != "total_loss", k))
    return "  ".join(f"{k[:-5]} {metrics[k]:.4g}" for k in keys if isinstance(metrics[k], float))


def format_summary(cfg, trainer, summary: Dict[str, object], first: Optional[Dict[str, float]] = None) -> str:
    from flashdino.engine.meta_arch import unwrap

    backbone = unwrap(trainer.model).teacher["backbone"]
    params = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())  # ZeRO-3: whole sizes
    m = cfg.model
    seconds = float(summary.get("train_seconds") or 0.0)
    images = int(summary.get("images_seen") or 0)
    rule = "-" * 72
    out = [rule, "flashdino run summary", rule]
    out.append(f"model      {cfg.objective.method}, {m.arch} patch {m.patch_size} at {m.img_size}px, "
               f"{len(backbone.blocks)} blocks x {backbone.embed_dim}, {params / 1e6:.2f}M backbone params"
               + (f" (preset {cfg.preset})" if cfg.preset else ""))
    out.append(f"trained    {summary.get('steps')} steps, {float(summary.get('epochs') or 0):.2f} epochs, "
               f"{images:,} images in {_duration(seconds)} ({images / max(seconds, 1e-9):.0f} img/s) on {trainer.device}")
    fit = summary.get("schedule_fit")
    if fit and fit["fitted_epochs"] < fit["planned_epochs"]:
        out.append(f"           schedule fitted to train.max_minutes: {fit['fitted_epochs']} of {fit['planned_epochs']} "
                   f"planned epochs ({fit['seconds_per_step'] * 1e3:.1f} ms/step measured at step {fit['at_step']})")
    if summary.get("stopped_early"):
        out.append(f"           STOPPED EARLY: {summary['stopped_early']} (the schedule did not finish)")
    out.append(f"losses     first log: {_losses(first)}")
    out.append(f"           last log:  {_losses(summary.get('last_metrics'))}")
    collapse = summary.get("collapse")
    if isinstance(collapse, dict) and collapse.get("last"):
        last = collapse["last"]
        state = (f"{collapse['warnings']} warning(s), first at step {collapse['first_warning_step']}"
                 if collapse["warnings"] else "no collapse warning")
        out.append(f"collapse   effective rank {last['collapse/effective_rank']:.1f}, std {last['collapse/std_ratio']:.2f} "
                   f"x isotropic: {state}")
    knn = summary.get("knn")
    if isinstance(knn, dict):
        k = str(cfg.eval.knn_k)
        out.append(f"k-NN       weighted {k}-NN (T = {cfg.eval.knn_temperature}), {summary.get('knn_data')}")
        labels = {"trained": "this run (teacher)", "random_init": "same network, random init", "raw_pixels": "raw pixels"}
        for name, label in labels.items():
            if name in knn and k in knn[name]:
                acc = knn[name][k]
                out.append(f"             {label:<28}{acc['top1']:6.2f}%   top-5 {acc['top5']:6.2f}%")
        if "trained" in knn and "random_init" in knn:
            gain = knn["trained"][k]["top1"] - knn["random_init"][k]["top1"]
            out.append(f"             {'gain over random init':<28}{gain:+6.2f} points")
    out_dir = trainer.output_dir
    out.append(f"files      {os.path.join(out_dir, 'checkpoint.pth')}")
    out.append(f"           {os.path.join(out_dir, 'metrics.jsonl')}  (TensorBoard: {os.path.join(out_dir, 'tensorboard')})")
    for p in summary.get("plots") or []:
        out.append(f"           {p}")
    if summary.get("knn_file"):
        out.append(f"           {summary['knn_file']}")
    ckpt = os.path.join(out_dir, "checkpoint.pth")
    out.append(f"next       flashdino eval knn --checkpoint {ckpt} --k 10 20 100 200")
    out.append(f"           flashdino eval linear --checkpoint {ckpt}")
    out.append(f"           flashdino export --checkpoint {ckpt} --output {os.path.join(out_dir, 'export')}")
    out.append(rule)
    return "\n".join(out)


def build_callbacks(cfg) -> List[object]:
    callbacks: List[object] = []
    if cfg.log.collapse_check:
        callbacks.append(CollapseMonitor())
    knn = None
    if cfg.eval.after_train and cfg.eval.knn_k > 0:
        knn = KnnAfterTraining(cfg)
        callbacks.append(knn)
    if cfg.log.plots:
        callbacks.append(EndOfRunPlots(cfg, images_reader=knn.test_reader if knn else None))
    callbacks.append(RunSummary(cfg))
    return callbacks
