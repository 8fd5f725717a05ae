"""Data parallelism on 2 CPU ranks (gloo, loopback) through the real training step.

* DeepSpeed ZeRO 1, 2 and 3: after every step the sharded teacher EMA equals the unsharded EMA of
  the consolidated student (m * teacher + (1 - m) * student, bit for bit), the forward's teacher copy
  follows it, and the whole run equals plain DDP;
* checkpoints save and resume bit-exactly under DDP and each ZeRO stage;
* reduce_cov: 2 ranks at batch B equal one process at batch 2B (loss, gradients, weights);
* virtual ranks: one process at batch 2B with virtual_ranks=2 equals 2 ranks at batch B;
* the end-of-run k-NN and attention maps under ZeRO-3 bf16 see the whole fp32 teacher;
* a time limit or a stop signal seen by one rank stops every rank at the same step.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

from flashdino.engine.config import build_config

from _ranks import free_port, spawn_ranks

WORLD = 2
TINY = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "model.img_size=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "crops.global_size=32",
    "crops.local_size=16", "crops.n_local=2", "data.dataset=synthetic", "data.synthetic_size=32",
    "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "train.log_every=1",
    "train.checkpoint_every=0", "log.tensorboard=false", "log.progress_bar=false", "log.plots=false",
]
STAGES = (1, 2, 3)


def tiny_config(out, *extra, batch=4):
    return build_config("simdino_vits16", overrides=TINY + [f"data.batch_size={batch}", f"train.output_dir={out}"]
                        + list(extra))



def _entry(rank, port, job, folder, world=WORLD):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        out = JOBS[job](rank, folder)
        torch.save(out, os.path.join(folder, f"{job}_rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_two_ranks(job, folder, world=WORLD):
    spawn_ranks(_entry, (free_port(), job, str(folder), world), nprocs=world)
    return [torch.load(os.path.join(folder, f"{job}_rank{r}.pt"), weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------------------------
# workers (run inside the spawned ranks)
# ----------------------------------------------------------------------------------------------


def _full_student(trainer):
    if trainer.runtime.name == "deepspeed":
        return trainer.runtime.full_student()
    return {k: v.detach().float().clone() for k, v in trainer.model.student.named_parameters()}


def _full_teacher(trainer):
    if trainer.runtime.name == "deepspeed":
        return trainer.runtime.ema.full_teacher()
    return {k: v.detach().float().clone() for k, v in trainer.model.teacher.named_parameters()}


def _teacher_compute_copy(trainer):
    """The teacher the forward uses (compute dtype; gathered under ZeRO-3)."""
    import contextlib

    params = dict(trainer.model.teacher.named_parameters())
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(params.values()))
    with ctx:
        return {k: p.detach().clone() for k, p in params.items()}


def _ema_run(out_dir, *overrides, steps=3):
    """A few steps with the unsharded-EMA check after each; returns the final consolidated weights."""
    from flashdino.engine.trainer import Trainer

    trainer = Trainer(tiny_config(out_dir, "train.resume=false", *overrides))
    it = iter(trainer.loader)
    worst_ema, worst_copy = 0.0, 0.0
    teacher = _full_teacher(trainer)
    for _ in range(steps):
        momentum = trainer.schedules.values(trainer.state.step)["momentum"]
        trainer.train_step(next(it))
        trainer.state.step += 1
        student, new_teacher = _full_student(trainer), _full_teacher(trainer)
        for name, t in new_teacher.items():
            expected = torch.lerp(teacher[name], student[name], 1.0 - momentum)
            worst_ema = max(worst_ema, float((t - expected).abs().max()))
        copy = _teacher_compute_copy(trainer)
        for name, t in new_teacher.items():
            worst_copy = max(worst_copy, float((copy[name].float() - t.to(copy[name].dtype).float()).abs().max()))
        teacher = new_teacher
    return {"ema_err": worst_ema, "copy_err": worst_copy, "student": student, "teacher": teacher,
            "runtime": trainer.runtime.name}


def job_zero_ema(rank, folder):
    out = {}
    common = ("train.precision=fp32", "model.drop_path_rate=0")
    out["ddp"] = _ema_run(os.path.join(folder, "ddp"), "runtime.distributed=ddp", *common)
    for stage in STAGES:
        out[f"zero{stage}"] = _ema_run(os.path.join(folder, f"z{stage}"), "runtime.distributed=deepspeed",
                                       f"runtime.zero_stage={stage}", *common)
    # the production precision: bf16 parameters, fp32 masters and teacher
    out["zero3_bf16"] = _ema_run(os.path.join(folder, "z3bf16"), "runtime.distributed=deepspeed",
                                 "runtime.zero_stage=3", "train.precision=bf16")
    # the Triton EMA kernel on the shards (interpreted on the CPU)
    out["zero2_triton_ema"] = _ema_run(os.path.join(folder, "z2triton"), "runtime.distributed=deepspeed",
                                       "runtime.zero_stage=2", "runtime.kernels.ema=triton", *common, steps=2)
    return out


def _fit(out_dir, steps, *overrides):
    from flashdino.engine.trainer import Trainer

    trainer = Trainer(tiny_config(out_dir, f"train.max_steps={steps}", *overrides))
    trainer.fit()
    return trainer


def job_resume(rank, folder):
    from flashdino.engine import trainer as trainer_mod

    # What each log step hands to the all-reduce: this rank's own loss terms (the logged values
    # must be their mean over the ranks, spec 3.6).
    local_losses, reduce = [], trainer_mod.mean_over_ranks
    trainer_mod.mean_over_ranks = lambda values: local_losses.append({k: float(v) for k, v in values.items()}) or reduce(values)
    out = {}
    runs = {"ddp": ("runtime.distributed=ddp", "train.precision=fp32")}
    for stage in STAGES:
        runs[f"zero{stage}"] = ("runtime.distributed=deepspeed", f"runtime.zero_stage={stage}", "train.precision=bf16")
    for name, overrides in runs.items():
        local_losses.clear()
        straight = _fit(os.path.join(folder, name, "straight"), 4, *overrides)
        straight_losses = list(local_losses)
        _fit(os.path.join(folder, name, "resumed"), 2, *overrides)
        resumed = _fit(os.path.join(folder, name, "resumed"), 4, *overrides)
        out[name] = {
            "steps": (straight.state.step, resumed.state.step),
            "student": (_full_student(straight), _full_student(resumed)),
            "teacher": (_full_teacher(straight), _full_teacher(resumed)),
            "shard_tags": sorted(os.listdir(os.path.join(folder, name, "resumed", "deepspeed")))
            if name.startswith("zero") else None,
            "local_losses": straight_losses,
        }
    return out


def image_pool(cfg, n_images, seed):
    """Per-image crops: (n, 2, C, G, G) global and (n, L, C, l, l) local, standard normal."""
    gen = torch.Generator().manual_seed(seed)
    c, g, l, n_local = cfg.model.in_chans, cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local
    return torch.randn(n_images, 2, c, g, g, generator=gen), torch.randn(n_images, n_local, c, l, l, generator=gen)


def crop_major_batch(pool, images):
    """The loaders' layout for the listed images: all images' view 0, then view 1, ... (spec 0)."""
    glob, loc = pool
    idx = torch.as_tensor(images)
    g, l = glob[idx], loc[idx]
    return {"global_crops": g.transpose(0, 1).reshape(-1, *g.shape[2:]),
            "local_crops": l.transpose(0, 1).reshape(-1, *l.shape[2:]),
            "masks": None, "mask_indices": None, "mask_weights": None}


def manual_steps(trainer, image_lists, seed=11):
    """train_step on hand-made batches; records losses, post-clip gradients and final weights."""
    records = []
    for step, images in enumerate(image_lists):
        pool = image_pool(trainer.cfg, 2 * B, seed + step)
        losses = trainer.train_step(crop_major_batch(pool, images))
        trainer.state.step += 1
        rec = {k: float(v.detach()) for k, v in losses.items() if k.endswith("loss")}
        if trainer.runtime.name != "deepspeed":
            rec["grads"] = {k: p.grad.detach().clone() for k, p in trainer.model.student.named_parameters()
                            if p.grad is not None}
        records.append(rec)
    return {"steps": records, "student": _full_student(trainer), "teacher": _full_teacher(trainer)}


REDUCE_COV = ("objective.reduce_cov=true", "model.drop_path_rate=0", "train.precision=fp32", "train.resume=false")
VIRTUAL = ("model.drop_path_rate=0", "train.precision=fp32", "train.resume=false")
B = 4
# Two steps; rank r holds images [r*B, (r+1)*B) of each step's batch of 2B.
RANK_IMAGES = [[list(range(r * B, (r + 1) * B)) for _ in range(2)] for r in range(WORLD)]
ALL_IMAGES = [list(range(2 * B)) for _ in range(2)]


def job_global_batch(rank, folder):
    from flashdino.engine.trainer import Trainer

    out = {}
    for name, overrides in (("reduce_cov_ddp", ("runtime.distributed=ddp",) + REDUCE_COV),
                            ("reduce_cov_zero2", ("runtime.distributed=deepspeed", "runtime.zero_stage=2") + REDUCE_COV),
                            ("virtual_ddp", ("runtime.distributed=ddp",) + VIRTUAL)):
        trainer = Trainer(tiny_config(os.path.join(folder, name), *overrides, batch=B))
        out[name] = manual_steps(trainer, RANK_IMAGES[rank])
    return out


def job_single_process_zero(rank, folder):
    """DeepSpeed in one process (it makes its own process group): ZeRO-2 and -3 equal the plain runtime."""
    common = ("train.precision=fp32", "model.drop_path_rate=0")
    out = {"local": _ema_run(os.path.join(folder, "local"), "runtime.distributed=none", *common, steps=2)}
    for stage in (2, 3):
        out[f"zero{stage}"] = _ema_run(os.path.join(folder, f"z{stage}"), "runtime.distributed=deepspeed",
                                       f"runtime.zero_stage={stage}", *common, steps=2)
    # Packed multi-crop under ZeRO-3: list-valued block calls go through DeepSpeed's parameter hooks.
    out["zero3_packed"] = _ema_run(os.path.join(folder, "z3p"), "runtime.distributed=deepspeed", "runtime.zero_stage=3",
                                   "runtime.multicrop=packed", *common, steps=2)
    return out


def job_eval_at_end(rank, folder):
    """ZeRO-3 in bf16, then the end-of-run k-NN and attention maps: they must see the whole fp32
    teacher (the engine's copy is bf16 and partitioned across the ranks)."""
    from flashdino.engine.eval.callbacks import build_callbacks
    from flashdino.engine.trainer import Trainer

    cfg = tiny_config(os.path.join(folder, "z3"), "runtime.distributed=deepspeed", "runtime.zero_stage=3",
                      "train.precision=bf16", "train.max_steps=2", "eval.after_train=true", "log.plots=true",
                      "eval.eval_size=32", "eval.resize_size=32", "eval.knn_k=5", "data.synthetic_size=16")
    trainer = Trainer(cfg, build_callbacks(cfg))
    summary = trainer.fit()
    backbone = trainer.teacher_backbone_for_eval()
    return {"summary_knn": summary.get("knn"), "plots": summary.get("plots"),
            "eval_teacher": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
            "full_teacher": _full_teacher(trainer), "output_dir": trainer.output_dir}


def job_time_limit(rank, folder):
    """train.max_minutes under DDP: rank 1's clock never runs out, rank 0's does at once; both must
    stop at the same (log) step, or the next collective would hang."""
    import flashdino.engine.trainer as trainer_mod
    from flashdino.engine.trainer import Trainer

    if rank == 1:
        trainer_mod.time = type("FrozenClock", (), {"perf_counter": staticmethod(lambda: 0.0)})
    cfg = tiny_config(os.path.join(folder, "run"), "runtime.distributed=ddp", "train.precision=fp32",
                      "train.max_minutes=1e-9", "train.log_every=2", "train.resume=false")
    summary = Trainer(cfg).fit()
    out = {"steps": summary["steps"], "stopped_early": summary["stopped_early"]}

    # train.fit_to_time: rank 0 runs 1 s per step on its clock, rank 1's clock stands still; both
    # must shorten the schedule to rank 0's answer (4 steps per epoch: 28 steps, see test_trainer).
    now = [0.0]
    trainer_mod.time = type("StepClock", (), {"perf_counter": staticmethod(lambda: now[0])})
    cfg = tiny_config(os.path.join(folder, "fit"), "runtime.distributed=ddp", "train.precision=fp32", "optim.epochs=10",
                      "train.max_minutes=0.5", "train.fit_to_time=true", "train.log_every=2", "train.resume=false")
    trainer = Trainer(cfg)
    step = trainer.train_step

    def timed_step(batch):
        now[0] += 1.0 if rank == 0 else 0.0
        return step(batch)

    trainer.train_step = timed_step
    summary = trainer.fit()
    out["fit"] = {"steps": summary["steps"], "fitted_epochs": summary["schedule_fit"]["fitted_epochs"],
                  "stopped_early": summary["stopped_early"]}

    # `flashdino train` ends a multi-process run by tearing the process group down (a live group at
    # interpreter exit can abort a finished run).
    from flashdino.engine.cli import main as cli_main

    out["cli_exit"] = cli_main(["train", "--preset", "simdino_vits16", "--output-dir", os.path.join(folder, "cli"), *TINY,
                                "data.batch_size=4", "runtime.distributed=ddp", "train.precision=fp32",
                                "train.max_steps=2", "train.resume=false"])
    out["group_alive_after_cli"] = dist.is_initialized()
    return out


class _SignalOnRank1:
    """Rank 1 alone sends itself SIGUSR1 from the log callback of `step` (a preemption notice that
    reached one node first)."""

    def __init__(self, step):
        self.step, self.ended = step, False

    def on_log(self, trainer, step, metrics, losses):
        import signal

        if trainer.rank == 1 and step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_end(self, trainer, summary):
        self.ended = True


def job_stop_signal(rank, folder):
    """A stop signal on one rank: every rank must stop at the same step, or the next collective
    (and the collective checkpoint under ZeRO-3) would hang; under DDP and DeepSpeed ZeRO-3."""
    from flashdino.engine.trainer import Trainer

    out = {}
    for name, extra in (("ddp", ["runtime.distributed=ddp"]),
                        ("zero3", ["runtime.distributed=deepspeed", "runtime.zero_stage=3"])):
        hook = _SignalOnRank1(step=2)
        cfg = tiny_config(os.path.join(folder, name), *extra, "train.precision=fp32", "train.resume=false")
        summary = Trainer(cfg, callbacks=[hook]).fit()
        out[name] = {"steps": summary["steps"], "stop_signal": summary["stop_signal"], "ended": hook.ended}
    return out


def job_activation_checkpointing(rank, folder):
    """ZeRO-3 gathers each block's shards in a forward hook; the backward's recomputation of a
    checkpointed block must gather them again and give the plain run's weights."""
    out = {}
    common = ("runtime.distributed=deepspeed", "runtime.zero_stage=3", "train.precision=fp32", "model.drop_path_rate=0.2")
    for name, extra in (("plain", ()), ("checkpointed", ("runtime.activation_checkpointing=2",))):
        trainer = _fit(os.path.join(folder, name), 3, *common, *extra)
        out[name] = {"student": _full_student(trainer), "teacher": _full_teacher(trainer)}
    return out


JOBS = {"activation_checkpointing": job_activation_checkpointing, "eval_at_end": job_eval_at_end,
        "stop_signal": job_stop_signal, "time_limit": job_time_limit, "zero_ema": job_zero_ema, "resume": job_resume, "global_batch": job_global_batch,
        "single_process_zero": job_single_process_zero}


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


def _assert_weights_close(a, b, rtol, atol, what):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")


def test_zero_stages_teacher_ema_equals_unsharded_ema(tmp_path):
    res = run_on_two_ranks("zero_ema", tmp_path)
    for rank_out in res:
        for name, run in rank_out.items():
            # torch's lerp on the shards is bit-identical to lerp on whole tensors; the Triton kernel
            # may round its fused multiply-add differently (<= 1 ulp of the O(0.1) weights).
            tol = 1e-7 if "triton" in name else 0.0
            assert run["ema_err"] <= tol, f"{name}: sharded EMA differs from the unsharded EMA by {run['ema_err']}"
            assert run["copy_err"] == 0.0, f"{name}: the forward's teacher copy is not the rounded master"
        ddp = rank_out["ddp"]
        assert ddp["runtime"] == "ddp"
        moved = max(float((ddp["teacher"][k] - ddp["student"][k]).abs().max()) for k in ddp["student"])
        assert moved > 0  # the EMA really lags the student
        for stage in STAGES:
            run = rank_out[f"zero{stage}"]
            assert run["runtime"] == "deepspeed"
            # Same math as DDP; only the order of the gradient reduction differs.
            _assert_weights_close(run["student"], ddp["student"], 1e-5, 1e-7, f"ZeRO-{stage} student")
            _assert_weights_close(run["teacher"], ddp["teacher"], 1e-5, 1e-7, f"ZeRO-{stage} teacher")
    for name in res[0]:  # every rank holds the same consolidated result
        _assert_weights_close(res[0][name]["teacher"], res[1][name]["teacher"], 0, 0, f"{name} rank 1")


def test_checkpoints_resume_bit_exactly_under_ddp_and_each_zero_stage(tmp_path):
    res = run_on_two_ranks("resume", tmp_path)
    for rank_out in res:
        for name, run in rank_out.items():
            assert run["steps"] == (4, 4), name
            for part in ("student", "teacher"):
                straight, resumed = run[part]
                _assert_weights_close(resumed, straight, 0, 0, f"{name} {part} after resume")
            if run["shard_tags"] is not None:  # only the shards of the kept checkpoints remain
                assert [t for t in run["shard_tags"] if t.startswith("step")] == ["step4"], run["shard_tags"]
    _assert_logged_losses_are_rank_means(tmp_path, res)


def _assert_logged_losses_are_rank_means(folder, res):
    """metrics.jsonl (written by rank 0) holds each loss term averaged over the ranks (spec 3.6)."""
    from flashdino.engine.metrics import read_jsonl

    for name in res[0]:
        logged = read_jsonl(os.path.join(folder, name, "straight", "metrics.jsonl"))
        per_rank = [r[name]["local_losses"] for r in res]
        assert len(logged) == len(per_rank[0]) == len(per_rank[1]) == 4, name
        assert any(a != b for s0, s1 in zip(*per_rank) for a, b in zip(s0.values(), s1.values())), \
            f"{name}: both ranks saw the same losses; the test cannot tell a mean from one rank's value"
        for record, r0, r1 in zip(logged, *per_rank):
            assert set(r0) == {k for k in record if k.endswith("_loss")}, name
            for key in r0:
                assert record[key] == pytest.approx((r0[key] + r1[key]) / 2, rel=1e-12, abs=1e-15), (name, key)


def test_deepspeed_in_a_single_process_equals_the_plain_runtime(tmp_path):
    (out,) = run_on_two_ranks("single_process_zero", tmp_path, world=1)
    for name in ("zero2", "zero3"):
        run = out[name]
        assert run["runtime"] == "deepspeed" and run["ema_err"] == 0.0 and run["copy_err"] == 0.0
        _assert_weights_close(run["student"], out["local"]["student"], 1e-6, 1e-8, f"{name} student")
        _assert_weights_close(run["teacher"], out["local"]["teacher"], 1e-6, 1e-8, f"{name} teacher")
    # Packing reorders the matmul rows, so the same math agrees to fp32 rounding, not bit for bit.
    packed = out["zero3_packed"]
    assert packed["runtime"] == "deepspeed" and packed["ema_err"] == 0.0
    _assert_weights_close(packed["student"], out["local"]["student"], 1e-5, 1e-6, "packed ZeRO-3 student")
    _assert_weights_close(packed["teacher"], out["local"]["teacher"], 1e-5, 1e-6, "packed ZeRO-3 teacher")


def _single_process(tmp_path, name, *overrides):
    from flashdino.engine.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / name, *overrides, batch=2 * B))
    return manual_steps(trainer, ALL_IMAGES)


def _mean_over_ranks(res, run, step, key):
    return sum(r[run]["steps"][step][key] for r in res) / len(res)


def test_reduce_cov_and_virtual_ranks_match_one_process_on_the_whole_batch(tmp_path):
    res = run_on_two_ranks("global_batch", tmp_path / "ranks")
    # reduce_cov: the covariance of all 2B rows, exactly one process's covariance at batch 2B.
    single = _single_process(tmp_path, "single_cov", *REDUCE_COV)
    # virtual ranks: one process at 2B computing the expansion term per group of B.
    virtual = _single_process(tmp_path, "single_virtual", "objective.virtual_ranks=2", *VIRTUAL)
    for run, ref in (("reduce_cov_ddp", single), ("reduce_cov_zero2", single), ("virtual_ddp", virtual)):
        for step, ref_step in enumerate(ref["steps"]):
            for key in ("total_loss", "comp_loss", "expa_loss"):
                # DDP averages the ranks' losses (and their gradients)
                assert _mean_over_ranks(res, run, step, key) == pytest.approx(ref_step[key], rel=1e-5), (run, step, key)
            if "grads" in res[0][run]["steps"][step]:
                for r in res:
                    _assert_weights_close(r[run]["steps"][step]["grads"], ref_step["grads"], 2e-4, 1e-7,
                                          f"{run} step {step} gradients")
        for r in res:
            _assert_weights_close(r[run]["student"], ref["student"], 1e-4, 1e-7, f"{run} student")
            _assert_weights_close(r[run]["teacher"], ref["teacher"], 1e-4, 1e-7, f"{run} teacher")
    # Without reduce_cov or virtual ranks, the expansion term is NOT the 2B one (spec T4).
    assert abs(single["steps"][0]["expa_loss"] - virtual["steps"][0]["expa_loss"]) > 1e-3


def test_end_of_run_knn_and_plots_see_the_whole_fp32_teacher_under_zero3(tmp_path):
    from flashdino.engine.eval.backbone import load_backbone
    from flashdino.engine.eval.data import resolve_eval_data
    from flashdino.engine.eval.features import EvalTransform
    from flashdino.engine.eval.knn import evaluate_knn

    res = run_on_two_ranks("eval_at_end", tmp_path)
    main = res[0]
    expected = {k[len("backbone."):]: v for k, v in main["full_teacher"].items() if k.startswith("backbone.")}
    _assert_weights_close(main["eval_teacher"], expected, 0, 0, "teacher given to the evaluation")
    assert any(p.endswith("attention_maps.png") for p in main["plots"]), main["plots"]
    # The k-NN the run printed equals an independent evaluation of the checkpoint's teacher.
    backbone, cfg, _ = load_backbone(os.path.join(main["output_dir"], "checkpoint.pth"))
    train_reader, test_reader, _ = resolve_eval_data(cfg)
    again = evaluate_knn(backbone, train_reader, test_reader, EvalTransform.from_config(cfg), ks=[cfg.eval.knn_k])
    k = str(cfg.eval.knn_k)
    assert main["summary_knn"]["trained"][k] == pytest.approx(again["knn"][cfg.eval.knn_k], abs=1e-9)
    assert res[1]["summary_knn"] is None  # only the main rank evaluates


if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="torch.distributed with gloo is not available")
if "deepspeed" not in sys.modules:
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # pragma: no cover
        pytestmark = pytest.mark.skip(reason="deepspeed is not installed")


def test_max_minutes_stops_every_rank_at_the_same_step(tmp_path):
    ranks = run_on_two_ranks("time_limit", tmp_path)
    assert [r["steps"] for r in ranks] == [2, 2]  # the first log step, on rank 0's clock
    assert all(r["stopped_early"].startswith("train.max_minutes=1e-09 reached at step 2") for r in ranks)
    assert [r["fit"] for r in ranks] == [{"steps": 28, "fitted_epochs": 7, "stopped_early": None}] * 2
    assert [(r["cli_exit"], r["group_alive_after_cli"]) for r in ranks] == [(0, False)] * 2


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from flashdino.engine import checkpoint as ckpt

    ranks = run_on_two_ranks("stop_signal", tmp_path)
    for name in ("ddp", "zero3"):
        assert [r[name] for r in ranks] == [{"steps": 2, "stop_signal": "SIGUSR1", "ended": False}] * 2, name
        state = ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path / name)), map_location="cpu")
        assert state["train_state"]["step"] == 2, name


def test_activation_checkpointing_under_zero3_equals_the_plain_run(tmp_path):
    for rank_out in run_on_two_ranks("activation_checkpointing", tmp_path):
        for part in ("student", "teacher"):
            plain, checkpointed = rank_out["plain"][part], rank_out["checkpointed"][part]
            assert plain.keys() == checkpointed.keys()
            for k in plain:
                assert torch.equal(plain[k], checkpointed[k]), (part, k)
