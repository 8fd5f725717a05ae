"""torch.compile for the training step: per-block (regional) or whole-forward compilation, with the
compile time, graphs and graph breaks accounted for.

Modes (``runtime.compile``):

| mode    | what is compiled                                                                       |
|---------|----------------------------------------------------------------------------------------|
| "none"  | nothing (eager)                                                                        |
| "block" | every transformer block of student and teacher, in place (``nn.Module.compile``): the  |
|         | blocks share code, so each distinct block configuration compiles once per crop shape;  |
|         | module names and state-dict keys do not change                                         |
| "full"  | the whole forward (teacher, student, heads, loss) as one graph; the backward is        |
|         | compiled by AOTAutograd from it                                                        |

Both modes compile in place with ``fullgraph=True``: a graph break inside a compiled region is an
error that names the line, not a silent slowdown. The optimizer step and the EMA are single fused multi-tensor calls
(torch's fused AdamW, ``_foreach_lerp_`` or the Triton EMA) and stay outside the graphs.

``cuda_graphs`` uses inductor's "reduce-overhead" mode (CUDA graphs; CUDA only).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Callable, Dict, List

import torch
from torch import nn

COMPILE_MODES = ("none", "block", "full")


class CompileConfigError(ValueError):
    """An invalid compile request (mode, backend or CUDA graphs on a CPU)."""


# ------------------------------------------------------------------------------------------
# accounting
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileStats:
    """What torch.compile did in this process (or since a snapshot, see :class:`CompileMonitor`)."""

    graphs: int = 0  # FX graphs dynamo captured: one per compiled region and variant (shape, grad mode)
    graph_breaks: int = 0
    break_reasons: Dict[str, int] = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0  # dynamo + AOTAutograd + inductor, forward and backward

    def summary(self) -> str:
        text = f"{self.graphs} graph(s), {self.graph_breaks} graph break(s), {self.compile_seconds:.1f} s compiling"
        if self.break_reasons:
            shown = list(self.break_reasons.items())[:3]
            text += "; breaks: " + "; ".join(f"{r.strip().splitlines()[0][:160]} (x{n})" for r, n in shown)
            if len(self.break_reasons) > 3:
                text += f"; ... {len(self.break_reasons) - 3} more distinct reason(s)"
        return text


def _time_spent() -> Dict[str, float]:
    try:
        from torch._dynamo.utils import calculate_time_spent

        return dict(calculate_time_spent())
    except Exception:  # noqa: BLE001 - private API; the timing is informational only
        return {}


def _compile_seconds(spent: Dict[str, float]) -> float:
    return float(spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0))


def compile_stats() -> CompileStats:
    """Process-wide totals from dynamo's counters."""
    from torch._dynamo.utils import counters

    breaks = Counter({str(k): int(v) for k, v in counters["graph_break"].items()})
    return CompileStats(
        graphs=int(counters["stats"].get("unique_graphs", 0)),
        graph_breaks=int(sum(breaks.values())),
        break_reasons=dict(breaks),
        compile_seconds=_compile_seconds(_time_spent()),
    )


class CompileMonitor:
    """Differences of :func:`compile_stats` since construction (or the last :meth:`reset`).

    The trainer reads it after the warm-up step (report) and later (recompile warning): both crop
    shapes appear in the first step, so any graph compiled after it is a recompile.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._start = compile_stats()

    def since_start(self) -> CompileStats:
        now, start = compile_stats(), self._start
        reasons = Counter(now.break_reasons)
        reasons.subtract(start.break_reasons)
        reasons = {k: v for k, v in reasons.items() if v > 0}
        return CompileStats(
            graphs=now.graphs - start.graphs,
            graph_breaks=sum(reasons.values()),
            break_reasons=reasons,
            compile_seconds=max(0.0, now.compile_seconds - start.compile_seconds),
        )


# ------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------


def _transformer_blocks(model: nn.Module) -> List[nn.Module]:
    from flashdino.engine.models.layers import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def _block_variants(blocks: List[nn.Module]) -> int:
    """Distinct graphs regional compilation will need per crop shape and grad mode.

    Dynamo specialises on a block's Python attributes (its drop-path rate and mode), so blocks
    that differ there compile separately; identical blocks share one graph."""
    return len({(getattr(b, "drop_path", 0.0), getattr(b, "drop_mode", None)) for b in blocks})


def _raise_recompile_limit(needed: int) -> None:
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < needed:
        dynamo_config.recompile_limit = needed


def _compile_kwargs(backend: str, cuda_graphs: bool) -> dict:
    kwargs = dict(backend=backend, fullgraph=True, dynamic=False)
    if cuda_graphs:
        if backend != "inductor":
            raise CompileConfigError(f"runtime.cuda_graphs needs the inductor backend, got compile backend {backend!r}")
        kwargs["mode"] = "reduce-overhead"
    return kwargs


def check_compile_request(mode: str, device, cuda_graphs: bool = False, method: str = "simdino") -> None:
    if mode not in COMPILE_MODES:
        raise CompileConfigError(f"unknown runtime.compile={mode!r}; valid: {', '.join(COMPILE_MODES)}")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise CompileConfigError(f"runtime.cuda_graphs=true needs a CUDA device; this run uses {device}")
    if cuda_graphs and mode == "none":
        raise CompileConfigError("runtime.cuda_graphs=true needs runtime.compile=block or full (CUDA graphs are "
                                 "captured by torch.compile's reduce-overhead mode)")


def compile_blocks(model: nn.Module, backend: str = "inductor", cuda_graphs: bool = False) -> int:
    """Compile every transformer block under `model` in place. Returns the number of blocks."""
    blocks = _transformer_blocks(model)
    if not blocks:
        raise CompileConfigError("runtime.compile=block found no transformer block (flashdino Block) to compile")
    kwargs = _compile_kwargs(backend, cuda_graphs)
    # Two crop shapes, grad on (student) and off (teacher), per block variant, plus slack.
    _raise_recompile_limit(4 * _block_variants(blocks) + 4)
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def compile_forward(model: nn.Module, backend: str = "inductor", cuda_graphs: bool = False) -> None:
    """Compile the model's whole forward (teacher + student + heads + loss) in place.

    The ``forward`` method is compiled, not the module call, so module hooks stay outside the graph
    (DeepSpeed's engine registers a forward pre-hook on the module it wraps), and a DDP or DeepSpeed
    wrapper keeps calling it. Inside DDP's forward, dynamo's DDP optimizer splits the graph at
    gradient-bucket boundaries so the all-reduces overlap the backward (not graph breaks)."""
    model.forward = torch.compile(model.forward, **_compile_kwargs(backend, cuda_graphs))


# Batch entries whose length changes from batch to batch: the masked-patch list of the v2 methods.
VARIABLE_LENGTH_KEYS = ("mask_indices", "mask_weights")


def mark_variable_lengths(batch) -> None:
    """Tell dynamo that the masked-patch count varies, so a new count reuses the graph instead of
    recompiling it (everything else in a batch has a fixed shape per crop size)."""
    for key in VARIABLE_LENGTH_KEYS:
        value = batch.get(key)
        if torch.is_tensor(value) and value.ndim >= 1:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def apply_compile(model: nn.Module, module: nn.Module, mode: str, device, backend: str = "inductor",
                  cuda_graphs: bool = False, method: str = "simdino") -> Callable:
    """Compile per `mode` and return the callable the trainer runs the forward with.

    `model` is the plain SSLMetaArch (compiled in place); `module` is what the forward is called on
    (the model itself or its distributed wrapper)."""
    check_compile_request(mode, device, cuda_graphs, method)
    if mode == "none":
        return module
    if mode == "block":
        compile_blocks(model, backend, cuda_graphs)
    else:
        compile_forward(model, backend, cuda_graphs)
    return module


@contextlib.contextmanager
def uncompiled(model: nn.Module):
    """Run `model`'s in-place compiled submodules (runtime.compile=block) eagerly inside the block.

    Evaluation feeds a trained teacher new shapes (batch 512, the last partial batch, the plot
    images); with dynamic=False every one would recompile every block (and record new CUDA graphs
    under reduce-overhead), up to the recompile limit, for a pass that runs once."""
    saved = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def reset_compiled_state() -> None:
    """Forget every compiled graph and counter (tests; a fresh model in the same process)."""
    torch._dynamo.reset()


__all__ = [
    "COMPILE_MODES",
    "CompileConfigError",
    "CompileMonitor",
    "CompileStats",
    "apply_compile",
    "check_compile_request",
    "compile_blocks",
    "compile_forward",
    "compile_stats",
    "mark_variable_lengths",
    "reset_compiled_state",
]
