"""torch.compile of the training step on the CPU: no graph breaks, both crop shapes compiled in the
warm-up step and never again, and the compiled step computes what the eager step computes.

Graph capture is dynamo's job whatever the backend, so most tests use the "aot_eager" backend
(dynamo + AOTAutograd, no code generation: seconds instead of minutes on 2 cores); one test runs
inductor itself.
"""
import pytest
import torch
import torch._dynamo.config as dynamo_config

from flashdino.engine.config import build_config
from flashdino.engine.runtime.compile import CompileConfigError, CompileMonitor, check_compile_request
from flashdino.engine.trainer import COMPILE_BACKEND_ENV, Trainer

TINY = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "model.img_size=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "head.n_prototypes=64",
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "data.dataset=synthetic",
    "data.synthetic_size=32", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
    "train.precision=fp32", "train.resume=false", "log.tensorboard=false", "log.progress_bar=false",
]


def make_trainer(tmp_path, preset, *extra):
    return Trainer(build_config(preset, overrides=TINY + [f"train.output_dir={tmp_path}"] + list(extra)))


def batches(trainer, n):
    it = iter(trainer.loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_steps(trainer, data, strict_after_first=True):
    """train_step over `data`; after the warm-up step any recompilation raises."""
    losses = []
    for k, batch in enumerate(data):
        if k == 1 and strict_after_first:
            dynamo_config.error_on_recompile = True
        try:
            out = trainer.train_step(batch)
        finally:
            dynamo_config.error_on_recompile = False
        trainer.state.step += 1
        losses.append({name: float(v.detach()) for name, v in out.items() if name.endswith("loss")})
    return losses


def assert_same_losses(ref, got):
    for a, b in zip(ref, got):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name


def test_block_compile_captures_each_block_variant_once_without_breaks(tmp_path):
    # SimDINOv2: uniform batch-subset drop path, so every student block is the same graph.
    trainer = make_trainer(tmp_path, "simdinov2_vitb16", "runtime.compile=block")
    run_steps(trainer, batches(trainer, 3))
    report = trainer.compile_report
    assert report.graph_breaks == 0, report.summary()
    # student blocks at the global and the local crop shape + teacher blocks (no grad) at the global shape
    assert report.graphs == 3, report.summary()
    assert trainer.recompiles_after_warmup == 0
    assert report.compile_seconds > 0


def test_block_compile_of_packed_multicrop_is_one_student_graph_matching_eager(tmp_path):
    # runtime.multicrop=packed: each student block takes both crop groups as one list, so one graph
    # covers them (plus the teacher's); the values equal the eager grouped step's, drop path included
    # (packed blocks get their stochastic-depth draws from outside the graph, in the grouped order).
    common = ("model.drop_path_rate=0.2", "train.seed=3")
    eager = make_trainer(tmp_path / "eager", "simdinov2_vitb16", *common)
    packed = make_trainer(tmp_path / "packed", "simdinov2_vitb16", "runtime.compile=block", "runtime.multicrop=packed",
                          *common)
    data = batches(eager, 3)
    torch.manual_seed(7)  # the same global RNG state for both runs' drop-path draws
    ref = run_steps(eager, data, strict_after_first=False)
    torch.manual_seed(7)
    got = run_steps(packed, data)
    report = packed.compile_report
    assert report.graph_breaks == 0 and report.graphs == 2, report.summary()
    assert packed.recompiles_after_warmup == 0
    assert_same_losses(ref, got)


def test_block_compile_of_linearly_rising_drop_path_is_one_graph_per_shape(tmp_path):
    # SimDINO: drop path rises linearly over depth (0 in block 0). The blocks read their rate from a
    # buffer, so the 3 non-zero rates share one graph per crop shape: 2 shapes x (no drop path,
    # drop path) for the student + 1 teacher graph = 5, whatever the depth.
    trainer = make_trainer(tmp_path, "simdino_vits16", "runtime.compile=block", "model.depth=4")
    assert len({blk.drop_path for blk in trainer.model.student["backbone"].blocks}) == 4
    run_steps(trainer, batches(trainer, 2))
    assert trainer.compile_report.graphs == 5 and trainer.compile_report.graph_breaks == 0
    assert trainer.recompiles_after_warmup == 0


def test_full_compile_is_one_graph_matching_the_eager_step(tmp_path):
    common = ("model.drop_path_rate=0", "train.seed=3")
    eager = make_trainer(tmp_path / "eager", "simdino_vits16", *common)
    compiled = make_trainer(tmp_path / "full", "simdino_vits16", "runtime.compile=full", *common)
    data = batches(eager, 3)
    ref = run_steps(eager, data, strict_after_first=False)
    got = run_steps(compiled, data)
    report = compiled.compile_report
    assert report.graph_breaks == 0 and report.graphs == 1, report.summary()
    assert compiled.recompiles_after_warmup == 0
    assert_same_losses(ref, got)
    for (name, p), q in zip(eager.model.student.named_parameters(), compiled.model.student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_full_compile_does_not_recompile_when_the_teacher_temperature_changes(tmp_path):
    # DINO warms the teacher temperature up per epoch (one step per epoch here): a float argument of
    # the compiled forward that changes every step.
    trainer = make_trainer(tmp_path, "dino_vits16", "runtime.compile=full", "optim.iters_per_epoch=1",
                           "optim.epochs=4", "objective.warmup_teacher_temp=0.04", "objective.teacher_temp=0.07",
                           "objective.warmup_teacher_temp_epochs=3")
    temps = [trainer.schedules.values(i)["teacher_temp"] for i in range(3)]
    assert len(set(temps)) == 3
    run_steps(trainer, batches(trainer, 3))
    assert trainer.compile_report.graph_breaks == 0
    assert trainer.recompiles_after_warmup == 0


def test_full_compile_reuses_the_graph_when_the_masked_patch_count_changes(tmp_path):
    trainer = make_trainer(tmp_path, "simdinov2_vitb16", "runtime.compile=full")
    data = batches(trainer, 4)
    assert len({b["mask_indices"].shape[0] for b in data}) > 1  # the iBOT sampler varies the count
    run_steps(trainer, data)
    assert trainer.compile_report.graphs == 1 and trainer.compile_report.graph_breaks == 0
    assert trainer.recompiles_after_warmup == 0


def test_monitor_counts_a_real_graph_break():
    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    monitor = CompileMonitor()
    torch.compile(broken, backend="aot_eager")(torch.ones(3))
    stats = monitor.since_start()
    assert stats.graph_breaks == 1 and stats.graphs == 2
    assert "graph_break" in " ".join(stats.break_reasons) or stats.break_reasons


def test_bad_compile_requests_are_refused():
    with pytest.raises(CompileConfigError, match="unknown runtime.compile='fast'"):
        check_compile_request("fast", "cpu")
    with pytest.raises(CompileConfigError, match="needs a CUDA device"):
        check_compile_request("block", "cpu", cuda_graphs=True)


@pytest.mark.slow
def test_inductor_block_compile_on_cpu_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "inductor")
    common = ("model.depth=1", "model.drop_path_rate=0", "train.seed=5")
    eager = make_trainer(tmp_path / "eager", "simdino_vits16", *common)
    compiled = make_trainer(tmp_path / "inductor", "simdino_vits16", "runtime.compile=block", *common)
    data = batches(eager, 2)
    ref = run_steps(eager, data, strict_after_first=False)
    got = run_steps(compiled, data)
    assert compiled.compile_report.graph_breaks == 0 and compiled.recompiles_after_warmup == 0
    for a, b in zip(ref, got):
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.gpu
def test_cuda_graphs_block_compile_matches_eager_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "inductor")
    common = ("model.drop_path_rate=0", "train.seed=5", "train.device=cuda")
    eager = make_trainer(tmp_path / "eager", "simdino_vits16", "runtime.compile=none", *common)  # auto = block on a GPU
    graphs = make_trainer(tmp_path / "graphs", "simdino_vits16", "runtime.compile=block", "runtime.cuda_graphs=true",
                          *common)
    data = batches(eager, 3)
    ref = run_steps(eager, data, strict_after_first=False)
    got = run_steps(graphs, data)
    assert graphs.compile_report.graph_breaks == 0 and graphs.recompiles_after_warmup == 0
    for a, b in zip(ref, got):
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-4, abs=1e-5)


def test_dinov2_full_compile_one_graph_through_varying_mask_counts_and_temperatures(tmp_path):
    # DINOv2: the patch-center update uses tensor ops only, and the teacher temperature arrives as a
    # 0-d tensor, so neither the masked-patch count nor the temperature warmup recompiles.
    trainer = make_trainer(tmp_path, "dinov2_vitb16", "runtime.compile=full", "head.n_prototypes=64",
                           "optim.iters_per_epoch=1", "optim.epochs=4", "objective.warmup_teacher_temp_epochs=3")
    data = batches(trainer, 3)
    assert len({b["mask_indices"].shape[0] for b in data}) > 1
    center_before = trainer.model.patch_center.clone()
    losses = run_steps(trainer, data)
    assert trainer.compile_report.graphs == 1 and trainer.compile_report.graph_breaks == 0
    assert trainer.recompiles_after_warmup == 0
    assert all(torch.isfinite(torch.tensor(v)) for step in losses for v in step.values())
    assert not torch.equal(trainer.model.patch_center, center_before)


def test_evaluation_runs_compiled_blocks_eagerly_and_restores_them():
    # A trained teacher compiled per block meets evaluation's new shapes: no recompiles there, and
    # the compiled graphs are back afterwards for training.
    from torch._dynamo.testing import CompileCounter

    from flashdino.engine.eval.backbone import prepared_for_eval
    from flashdino.engine.models import VisionTransformer
    from flashdino.engine.runtime.compile import compile_blocks

    torch._dynamo.reset()
    counter = CompileCounter()
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=24, depth=2, num_heads=2).eval()
    compile_blocks(model, backend=counter)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        want = model(x)
        compiled = counter.frame_count
        assert compiled >= 1
        with prepared_for_eval(model, None):
            got = model(x)
            model(torch.randn(7, 3, 28, 28))  # a new batch size
            assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.blocks)
        assert counter.frame_count == compiled
        assert all(b._compiled_call_impl is not None for b in model.blocks)
        model(x)
        assert counter.frame_count == compiled  # the restored graphs serve the training shape again
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()
