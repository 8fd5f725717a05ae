"""Numerical parity: the engine against the reference eager implementation, step by step.

Examples:
  flashdino parity --preset simdino_vitb16 runtime.compile=block runtime.kernels.coding_rate=triton
  flashdino parity --preset demo --steps 5 runtime.kernels.ema=triton          # tiny, runs on a CPU

Both sides start from the same weights, see the same batches and the same global RNG state before
each step (drop path), and take N optimizer steps in lockstep. After every step the harness
compares: every scalar loss term, the gradient norm of every optimizer parameter group and of the
backbone / head / whole student (the gradients the optimizer used: unscaled and clipped), and the
largest relative error over all student parameters, teacher parameters and loss buffers (DINO
centers). It exits 1 when any of them exceeds the tolerance of the run's precision.

Error measures (b = reference, a = engine):
  scalars (losses, gradient norms): |a - b| / max(|b|, 1e-6)
  parameters: ||a - b||_2 / ||b||_2 over all student parameters (likewise teacher, loss buffers).
  The worst single tensor is reported too, but not checked: a parameter whose true gradient is
  zero (the key part of the attention qkv bias: softmax ignores it) gets Adam updates of about
  the LR driven by rounding noise alone, which any two implementations draw differently (seen
  in fp32 on the CPU: ~5e-4 relative on a zero-initialized qkv bias after one step at LR 1e-6).
  Over the whole set that noise weighs lr * sqrt(n_noise) / ||theta||, far below 1e-5.

Tolerances, relative, checked at every step (not accumulated):
  fp32  loss 1e-5, gradient norms 1e-5, parameters 1e-5. Both sides run true fp32 (TF32 matmuls
        are switched off for the run), so only summation order differs (~1e-7 per reduction).
  fp16  loss 5e-3, gradient norms 1e-2, parameters 2e-3.
  bf16  loss 4e-2, gradient norms 8e-2, parameters 1.6e-2.
Why: under autocast the two sides round to 16 bits at different places (a fused kernel or flash
attention keeps fp32 intermediates that the eager path rounds). Each rounding costs up to the
unit roundoff u (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3); about ten of them lie on the path from
the crops to a loss, hence 10u for losses, and a gradient norm passes through the backward as
well, hence 20u. An AdamW step moves a parameter by about the LR, so parameter errors stay a
small multiple of u at warm-up LRs (4u); parity runs placed at a peak LR of ~1e-3 should allow
more, because Adam turns the sign noise of near-zero gradients into full-size updates.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from . import env, harness

TOLERANCES: Dict[str, Dict[str, float]] = {
    "fp32": {"loss": 1e-5, "grad_norm": 1e-5, "param": 1e-5},
    "fp16": {"loss": 5e-3, "grad_norm": 1e-2, "param": 2e-3},
    "bf16": {"loss": 4e-2, "grad_norm": 8e-2, "param": 1.6e-2},
}
SCALAR_FLOOR = 1e-6
TENSOR_FLOOR = 1e-12
# Values the trainer adds to the loss dict that come from the schedules, not from the step's math.
_SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


def scalar_rel_err(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if a == b else math.inf  # equal infinities match; any NaN never does
    return abs(a - b) / max(abs(b), SCALAR_FLOOR)


@torch.no_grad()
def tensor_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"tensor shapes differ: engine {tuple(a.shape)} vs reference {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).norm() / max(float(b.norm()), TENSOR_FLOOR))


def tolerances_for(precision: str, overrides: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    if precision not in TOLERANCES:
        raise ValueError(f"parity: no tolerances for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    tol = dict(TOLERANCES[precision])
    for key, value in (overrides or {}).items():
        if key not in tol:
            raise ValueError(f"parity: unknown tolerance {key!r}; valid: {', '.join(tol)}")
        if not value > 0:
            raise ValueError(f"parity: tolerance {key} must be > 0, got {value}")
        tol[key] = float(value)
    return tol


# ------------------------------------------------------------------------------------------
# what is compared
# ------------------------------------------------------------------------------------------


def _named_student_params(trainer) -> Dict[str, torch.nn.Parameter]:
    model = harness.unwrap_model(trainer)
    out = {"backbone." + n: p for n, p in model.student["backbone"].named_parameters()}
    out.update({"head." + n: p for n, p in model.student["head"].named_parameters()})
    return out


def _group_label(i: int, group: Dict[str, Any]) -> str:
    label = f"group{i} (lr x{group.get('lr_mult', 1.0):.3g}, wd x{group.get('wd_mult', 1.0):g}"
    if group.get("is_last_layer"):
        label += ", last layer"
    return label + f", {len(group['params'])} tensors)"


def gradient_groups(reference) -> Dict[str, List[str]]:
    """{label: parameter names}: the optimizer groups of the config, then backbone, head, student.

    The groups are rebuilt from the config and the model (``build_param_groups``), so this does not
    depend on where a runtime keeps its optimizer (torch AdamW, the fused Triton one, DeepSpeed).
    """
    from flashdino.engine.optim import build_param_groups

    model = harness.unwrap_model(reference)
    named = _named_student_params(reference)
    ids = {id(p): n for n, p in named.items()}
    groups = {}
    for i, group in enumerate(build_param_groups(reference.cfg, model.student["backbone"], model.student["head"])):
        names = [ids[id(p)] for p in group["params"]]
        groups[_group_label(i, group)] = names
    groups["backbone"] = [n for n in named if n.startswith("backbone.")]
    groups["head"] = [n for n in named if n.startswith("head.")]
    groups["student"] = list(named)
    return groups


def gradient_norms(trainer, groups: Dict[str, List[str]]) -> Dict[str, Any]:
    """L2 norm of the current .grad over each group; names without a gradient are counted."""
    named = _named_student_params(trainer)
    norms, missing = {}, {}
    for label, names in groups.items():
        sq, absent = torch.zeros((), dtype=torch.float64), 0
        for n in names:
            g = named[n].grad
            if g is None:
                absent += 1
                continue
            sq = sq + g.detach().double().pow(2).sum().cpu()
        norms[label] = float(sq.sqrt())
        missing[label] = absent
    return {"norms": norms, "missing": missing}


def _loss_terms(losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {k: float(v.detach().float()) for k, v in losses.items()
            if torch.is_tensor(v) and v.ndim == 0 and k not in _SCHEDULE_KEYS}


def compare_states(engine, reference) -> Dict[str, Any]:
    """Relative error of student, teacher and loss buffers (whole set: checked; worst tensor: shown).

    The float64 arithmetic stays on the reference's device and each part comes back to the host in
    one transfer: copying a ViT-B student, teacher and head to the CPU after every step cost seconds
    per step, more than the steps themselves.
    """
    device = reference.device
    e, r = harness.model_state(engine, device), harness.model_state(reference, device)
    out = {}
    for part in ("student", "teacher", "buffers"):
        missing = sorted(set(r[part]) ^ set(e[part]))
        names, rows = [], []  # per tensor: |a-b|^2, |b|^2, finite
        for name, ref_t in r[part].items():
            if name not in e[part] or not ref_t.is_floating_point():
                continue
            a, b = e[part][name].double(), ref_t.double()
            if a.shape != b.shape:
                raise ValueError(f"{part} tensor '{name}': engine shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
            finite = torch.isfinite(a).all() & torch.isfinite(b).all()
            rows.append(torch.stack([(a - b).pow(2).sum(), b.pow(2).sum(), finite.double()]))
            names.append(name)
        stats = torch.stack(rows).cpu() if rows else torch.zeros(0, 3, dtype=torch.float64)
        diff_sq, ref_sq, finite = stats[:, 0], stats[:, 1], stats[:, 2] > 0
        errs = torch.where(finite, diff_sq.sqrt() / ref_sq.sqrt().clamp_min(TENSOR_FLOOR), torch.full_like(diff_sq, math.inf))
        worst_i = int(errs.argmax()) if len(names) else None
        all_finite = bool(finite.all())
        rel = math.sqrt(float(diff_sq.sum())) / max(math.sqrt(float(ref_sq.sum())), TENSOR_FLOOR) if all_finite else math.inf
        out[part] = {"rel_err": rel, "max_tensor_rel_err": float(errs[worst_i]) if worst_i is not None else 0.0,
                     "worst_tensor": names[worst_i] if worst_i is not None else None,
                     "tensors": len(names), "unmatched": missing}
    return out


def compare_step(step: int, losses_e, losses_r, grads_e, grads_r, states, tol) -> Dict[str, Any]:
    failures: List[str] = []
    terms_e, terms_r = _loss_terms(losses_e), _loss_terms(losses_r)
    losses = {}
    for k, ref_v in terms_r.items():
        if k not in terms_e:
            failures.append(f"loss term '{k}' missing on the engine side")
            continue
        err = scalar_rel_err(terms_e[k], ref_v)
        losses[k] = {"engine": terms_e[k], "reference": ref_v, "rel_err": err}
        if not err <= tol["loss"]:
            failures.append(f"loss '{k}': rel err {err:.3g} > {tol['loss']:g}")
    for k in terms_e:
        if k not in terms_r:
            failures.append(f"loss term '{k}' only on the engine side")
    grad_norms = {}
    for label, ref_n in grads_r["norms"].items():
        eng_n = grads_e["norms"][label]
        err = scalar_rel_err(eng_n, ref_n)
        entry = {"engine": eng_n, "reference": ref_n, "rel_err": err,
                 "no_grad_engine": grads_e["missing"][label], "no_grad_reference": grads_r["missing"][label]}
        grad_norms[label] = entry
        if entry["no_grad_engine"] != entry["no_grad_reference"]:
            failures.append(f"grad norm '{label}': {entry['no_grad_engine']} tensors without a gradient on the "
                            f"engine side vs {entry['no_grad_reference']} on the reference")
        elif not err <= tol["grad_norm"]:
            failures.append(f"grad norm '{label}': rel err {err:.3g} > {tol['grad_norm']:g}")
    for part, info in states.items():
        if info["unmatched"]:
            failures.append(f"{part}: tensors present on one side only: {info['unmatched'][:5]}")
        if not info["rel_err"] <= tol["param"]:
            failures.append(f"{part}: rel err {info['rel_err']:.3g} > {tol['param']:g} (worst tensor "
                            f"'{info['worst_tensor']}': {info['max_tensor_rel_err']:.3g})")
    return {
        "step": step,
        "losses": losses,
        "max_loss_rel_err": max((v["rel_err"] for v in losses.values()), default=0.0),
        "grad_norms": grad_norms,
        "max_grad_norm_rel_err": max((v["rel_err"] for v in grad_norms.values()), default=0.0),
        "params": states,
        "ok": not failures,
        "failures": failures,
    }


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def _set_fallback_random(value: bool) -> bool:
    """Compiled graphs draw random numbers (drop path) with their own generator unless told to use
    eager's; parity needs the same draws on both sides. Returns the previous setting (it is
    process-wide, and slower: a bench later in the same process must not inherit it)."""
    import torch._inductor.config as inductor_config

    old = inductor_config.fallback_random
    inductor_config.fallback_random = value
    return old


def run_parity(engine_cfg, steps: int = 5, data: str = "synthetic", reference_cfg=None,
               tolerances: Optional[Dict[str, float]] = None, pool: int = 4,
               command: Optional[str] = None, config_file: Optional[str] = None,
               time_limit: Optional[float] = None) -> Dict[str, Any]:
    """Run `steps` steps of the engine and the reference in lockstep; return the report dict.

    `time_limit` (seconds, from the first step): stop early and report the steps done, as a failed
    run that says so, instead of being killed by an outer deadline with nothing written.

    `reference_cfg` defaults to the reference derived from `engine_cfg`; pass one to compare two
    arbitrary configs (e.g. to check that the harness notices a difference).
    """
    if steps < 1:
        raise ValueError(f"parity: steps must be >= 1, got {steps}")
    cfg_e = harness.harness_config(engine_cfg, data)
    if reference_cfg is None:
        cfg_r, _ = harness.reference_config(cfg_e)
    else:
        cfg_r = harness.harness_config(reference_cfg, data, scratch_dir=cfg_e.train.output_dir + "-reference")
    precision = cfg_e.train.precision
    if cfg_r.train.precision != precision:
        raise ValueError(f"parity: engine precision {precision} != reference precision {cfg_r.train.precision}")
    tol = tolerances_for(precision, tolerances)

    fallback_random = _set_fallback_random(True) if cfg_e.runtime.compile != "none" else None
    try:
        return _lockstep(cfg_e, cfg_r, steps, data, tol, pool, command, engine_cfg, config_file, time_limit)
    finally:
        if fallback_random is not None:
            _set_fallback_random(fallback_random)


def _lockstep(cfg_e, cfg_r, steps, data, tol, pool, command, engine_cfg, config_file, time_limit) -> Dict[str, Any]:
    precision = cfg_e.train.precision
    reference = harness.build_trainer(cfg_r)
    engine = harness.build_trainer(cfg_e)
    init_diff = harness.load_model_state(engine, harness.model_state(reference))
    device = reference.device
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if precision == "fp32":  # the 1e-5 budget is for true fp32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    groups = gradient_groups(reference)
    if data == "synthetic":
        batches = harness.synthetic_batches(cfg_r, device, pool=pool, seed=cfg_r.train.seed)
    else:
        batches = harness.loader_batches(reference)
    seed = cfg_r.train.seed
    records = []
    engine_error, stopped_early = None, None
    t0 = time.monotonic()
    try:
        for step in range(steps):
            if time_limit is not None and step > 0 and time.monotonic() - t0 > time_limit:
                stopped_early = f"time limit of {time_limit:g} s reached after {step} of {steps} steps"
                print(f"flashdino parity: {stopped_early}", file=sys.stderr)
                break
            batch = next(batches)
            harness.seed_step(seed, step)
            losses_r = harness.run_step(reference, batch)
            harness.seed_step(seed, step)
            try:
                losses_e = harness.run_step(engine, batch)
            except Exception as exc:  # the engine failing is a parity result, not a harness crash
                engine_error = f"step {step}: {type(exc).__name__}: {exc}"
                records.append({"step": step, "losses": {}, "max_loss_rel_err": math.inf, "grad_norms": {},
                                "max_grad_norm_rel_err": math.inf, "params": {}, "ok": False,
                                "failures": [f"the engine step raised {type(exc).__name__}: {exc}"]})
                break
            grads_r, grads_e = gradient_norms(reference, groups), gradient_norms(engine, groups)
            records.append(compare_step(step, losses_e, losses_r, grads_e, grads_r,
                                        compare_states(engine, reference), tol))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    del reference, engine, batches
    harness.free_memory()  # a suite runs bench next in the same process
    no_grad = sum(v["no_grad_engine"] for v in records[-1]["grad_norms"].values()) if records else 0
    if engine_error:
        print(f"flashdino parity: the engine failed at {engine_error}", file=sys.stderr)
    report = {
        "kind": "flashdino.parity",
        "schema": 1,
        "meta": env.run_metadata(device, command),
        "config": {
            "label": harness.config_label(engine_cfg, config_file),
            "hash": harness.config_hash(engine_cfg),
            "engine_vs_reference": harness.config_differences(cfg_e, cfg_r),
        },
        "workload": {"method": cfg_e.objective.method, "arch": cfg_e.model.arch, "batch_size": cfg_e.data.batch_size,
                     "precision": precision, "data": data, "steps": steps},
        "tolerances": tol,
        "error_measures": {"scalar": f"|a-b| / max(|b|, {SCALAR_FLOOR:g})",
                           "tensors": f"||a-b||_2 / max(||b||_2, {TENSOR_FLOOR:g}) over all parameters of a "
                                      "set (student, teacher, buffers); per tensor: shown, not checked"},
        "init_max_abs_diff": init_diff,
        "grad_tensors_without_grad_last_step": no_grad,
        "steps": records,
        "engine_error": engine_error,
        "stopped_early": stopped_early,
        "ok": all(r["ok"] for r in records) and len(records) == steps,
        "first_failure_step": next((r["step"] for r in records if not r["ok"]), None),
    }
    return report


def to_markdown(report: Dict[str, Any]) -> str:
    tol, w = report["tolerances"], report["workload"]
    diffs = report["config"]["engine_vs_reference"]
    lines = [f"# flashdino parity: {report['config']['label']}", ""] + env.describe(report["meta"]) + [
        f"- workload: {w['method']} {w['arch']}, batch {w['batch_size']}, {w['precision']}, data {w['data']}, {w['steps']} steps",
        "- engine vs reference: " + (", ".join(f"{k} {a} (reference {b})" for k, (a, b) in diffs.items())
                                     or "identical configs"),
        f"- tolerances ({w['precision']}, relative, every step): loss {tol['loss']:g}, gradient norms "
        f"{tol['grad_norm']:g}, parameters {tol['param']:g}",
        f"- error measures: scalars {report['error_measures']['scalar']}; parameters {report['error_measures']['tensors']}",
        f"- initial weights: max |engine - reference| after the copy = {report['init_max_abs_diff']:.3g}",
        "",
        "| step | total_loss (reference) | max loss err | max grad-norm err | student params | teacher params | buffers "
        "| worst student tensor (not checked) | status |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["steps"]:
        if not r["params"]:  # the engine raised in this step
            lines.append(f"| {r['step']} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | FAIL |")
            continue
        total = r["losses"].get("total_loss", {}).get("reference")
        p = r["params"]
        lines.append(
            f"| {r['step']} | {'n/a' if total is None else format(total, '.6g')} | {r['max_loss_rel_err']:.3g} | "
            f"{r['max_grad_norm_rel_err']:.3g} | {p['student']['rel_err']:.3g} | {p['teacher']['rel_err']:.3g} | "
            f"{p['buffers']['rel_err']:.3g} | {p['student']['max_tensor_rel_err']:.3g} "
            f"({p['student']['worst_tensor']}) | {'ok' if r['ok'] else 'FAIL'} |")
    last = next((r for r in reversed(report["steps"]) if r["grad_norms"]), None)
    if last:
        lines += ["", f"Gradient norms at step {last['step']}:", "", "| group | reference | engine | rel err |",
                  "|---|---:|---:|---:|"]
        for label, g in last["grad_norms"].items():
            lines.append(f"| {label} | {g['reference']:.6g} | {g['engine']:.6g} | {g['rel_err']:.3g} |")
    failures = [(r["step"], f) for r in report["steps"] for f in r["failures"]]
    if report.get("stopped_early"):
        verdict = f"FAIL (incomplete: {report['stopped_early']}; {len(failures)} violations in the steps run)"
    elif report["ok"]:
        verdict = "PASS"
    else:
        verdict = f"FAIL ({len(failures)} violations, first at step {report['first_failure_step']})"
    lines += ["", "Result: " + verdict]
    for step, f in failures[:20]:
        lines.append(f"- step {step}: {f}")
    if len(failures) > 20:
        lines.append(f"- ... and {len(failures) - 20} more")
    return "\n".join(lines) + "\n"


def write_outputs(report: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "parity.json"), "markdown": os.path.join(out_dir, "parity.md")}
    with open(paths["json"], "w") as fh:
        json.dump(report, fh, indent=2, default=lambda v: None if v != v else str(v))
    with open(paths["markdown"], "w") as fh:
        fh.write(to_markdown(report))
    return paths


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps compared")
    parser.add_argument("--data", choices=("synthetic", "pipeline"), default="synthetic")
    parser.add_argument("--pool", type=int, default=4, help="distinct synthetic batches cycled through")
    parser.add_argument("--rtol", type=float, help="one relative tolerance for losses, gradient norms and parameters")
    parser.add_argument("--rtol-loss", type=float)
    parser.add_argument("--rtol-grad", type=float)
    parser.add_argument("--rtol-param", type=float)
    parser.add_argument("--out", help="output folder (default: profiling/results/parity/<device>/<config label>)")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="stop after S seconds of steps and write what was compared (the run then fails as incomplete)")


def main(args) -> int:
    from .bench import DEFAULT_RESULTS, _slug, config_from_args

    overrides: Dict[str, float] = {}
    if args.rtol is not None:
        overrides = {"loss": args.rtol, "grad_norm": args.rtol, "param": args.rtol}
    for key, value in (("loss", args.rtol_loss), ("grad_norm", args.rtol_grad), ("param", args.rtol_param)):
        if value is not None:
            overrides[key] = value
    cfg = config_from_args(args)
    try:  # bad numbers are reported before any model is built
        tolerances_for(cfg.train.precision, overrides)
        if args.steps < 1 or args.pool < 1:
            raise ValueError(f"--steps and --pool must be >= 1, got {args.steps} and {args.pool}")
        if args.time_limit is not None and args.time_limit <= 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    except ValueError as exc:
        print(f"flashdino parity: {exc}", file=sys.stderr)
        return 2
    command = env.cli_command("parity", args)
    report = run_parity(cfg, steps=args.steps, data=args.data, tolerances=overrides, pool=args.pool,
                        command=command, config_file=args.config, time_limit=args.time_limit)
    out_dir = args.out or os.path.join(DEFAULT_RESULTS, "parity", _slug(report["meta"]["device"]["name"]),
                                       report["config"]["label"])
    paths = write_outputs(report, out_dir)
    print(to_markdown(report))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0 if report["ok"] else 1
