"""DeepSpeed runtime: ZeRO stage 1, 2 or 3, in bf16 or fp32.

What DeepSpeed owns: the parameter / gradient / optimizer-state partitioning, the gradient
reduction, the fp32 master weights and the optimizer step (our torch AdamW is passed in as a client
optimizer: no compiled DeepSpeed ops are needed). What stays ours:

* **the schedule**: LR and WD are written into the client optimizer's param groups, which DeepSpeed
  keeps using (with their ``lr_mult`` / ``wd_mult``);
* **clipping** (spec 1.6: per parameter for v1, per sub-module global norm for v2), computed on the
  gradient shards with one all-reduce of the per-parameter squared norms; DeepSpeed's own global
  clipping is off;
* **the teacher EMA**, sharded like the student (:class:`~flashdino.engine.ema.ZeroFragmentEMA` for
  stages 1-2, :class:`~flashdino.engine.ema.ZeroPartitionEMA` for stage 3), with fp32 teacher masters;
* **checkpoints**: DeepSpeed writes its sharded state under ``output_dir/deepspeed/step<N>/``;
  ``checkpoint.pth`` (the commit point) names that tag and also holds the consolidated fp32 student
  and teacher, so evaluation and export read it like any other checkpoint.

Precision: ``train.precision=bf16`` runs DeepSpeed's bf16 mode (bf16 parameters and activations,
fp32 master weights and teacher); ``fp32`` runs in fp32; fp16 (loss scaling) is refused.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from flashdino.engine.checkpoint import step_checkpoints
from flashdino.engine.ema import ZeroFragmentEMA, ZeroPartitionEMA
from flashdino.engine.optim import build_optimizer, build_param_groups

from .build_locks import warn_stale_build_locks
from .ddp import DistributedConfigError

SHARD_DIR = "deepspeed"
_TAG_RE = re.compile(r"^step(\d+)$")


def deepspeed_config(cfg, world_size: int, device: torch.device) -> Dict[str, Any]:
    """The DeepSpeed JSON config this run implies (gradient accumulation 1, no DeepSpeed clipping)."""
    on_gpu = device.type == "cuda"
    zero: Dict[str, Any] = {"stage": cfg.runtime.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu,
                            "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)}
    if cfg.runtime.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update({"stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5)})
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "gradient_clipping": 0.0,  # spec 1.6 clipping is done on the shards by ShardedGradClipper
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def check_deepspeed_request(cfg) -> None:
    if cfg.runtime.zero_stage == 0:
        raise DistributedConfigError(
            "runtime.distributed=deepspeed needs runtime.zero_stage 1, 2 or 3; for plain data parallelism "
            "use runtime.distributed=ddp (or auto)"
        )
    if cfg.train.precision == "fp16":
        raise DistributedConfigError(
            "runtime.distributed=deepspeed supports train.precision=bf16 or fp32; fp16 loss scaling under ZeRO "
            "is not supported by this engine (use bf16, or runtime.distributed=ddp for fp16 autocast)"
        )
    if cfg.objective.method == "dino" and cfg.objective.freeze_last_layer_epochs > 0:
        raise DistributedConfigError(
            "DINO's first-epoch prototype freeze drops whole parameters from the optimizer step, which ZeRO's flat "
            "shards cannot express; set objective.freeze_last_layer_epochs=0 or use runtime.distributed=ddp"
        )
    if cfg.runtime.kernels.optimizer != "torch":
        raise DistributedConfigError(
            f"runtime.kernels.optimizer={cfg.runtime.kernels.optimizer} under DeepSpeed: ZeRO owns the optimizer "
            "step on its flat shards (the sharded EMA already runs the Triton kernel with runtime.kernels.ema=triton); "
            "set runtime.kernels.optimizer=torch"
        )
    if cfg.runtime.zero_stage == 3 and cfg.runtime.compile != "none":
        raise DistributedConfigError(
            f"runtime.compile={cfg.runtime.compile} with runtime.zero_stage=3: ZeRO-3 gathers parameters in hooks "
            "on every sub-module, which torch.compile can only step around with a graph break per layer. Use "
            "runtime.zero_stage=2 (parameters replicated, gradients and optimizer state sharded) for compiled "
            "runs, or runtime.compile=none with ZeRO-3"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise DistributedConfigError(f"runtime.distributed=deepspeed needs the deepspeed package ({err}); "
                                     "pip install deepspeed") from err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; make a local one when none exists."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def _vit_direct_parameters(model) -> List[torch.nn.Parameter]:
    """Parameters a ViT reads in ``forward_features`` itself (CLS / register / mask tokens, pos-embed).
    The meta-architecture calls ``forward_features``, not the backbone's ``__call__``, so ZeRO-3's
    module hooks never gather them; they are registered on the meta-architecture instead."""
    from flashdino.engine.models.vit import VisionTransformer

    out = []
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            out.extend(module.parameters(recurse=False))
    return out


class ShardedGradClipper:
    """Spec 1.6 clipping on ZeRO gradient shards.

    Each rank holds a piece of every gradient (stages 1-2: the fragment its optimizer partition owns;
    stage 3: the parameter's partition). Per-parameter squared norms of the local pieces are summed
    over ranks with one all-reduce of a (P,) vector; the scales are then applied to the local pieces.
    """

    def __init__(self, student: torch.nn.ModuleDict, stage: int):
        self.stage = stage
        self.params = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
        self.module_index = torch.tensor([0 if name.startswith("backbone.") else 1 for name, _ in self.params])
        self._index_cache = {}  # (device, present positions) -> index tensor on that device

    def _local_grads(self) -> List[Optional[torch.Tensor]]:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return [safe_get_local_grad(p) for _, p in self.params]
        grads = []
        for _, p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                grads.append(None)
                continue
            g = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
            addr = mapping.lp_fragment_address
            if g.numel() != addr.numel:  # an optimizer that keeps the whole gradient: take our fragment
                g = g.narrow(0, addr.start, addr.numel)
            grads.append(g)
        return grads

    @torch.no_grad()
    def clip(self, mode: str, max_norm: float, device: torch.device) -> Dict[str, torch.Tensor]:
        grads = self._local_grads()
        present = [i for i, g in enumerate(grads) if g is not None]
        sq = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        if present:
            norms = torch._foreach_norm([grads[i].float() for i in present])
            sq[self._on_device(device, tuple(present))] = torch.stack(norms).to(device) ** 2
        dist.all_reduce(sq)
        module_index = self._on_device(device, None)
        module_sq = torch.zeros(2, dtype=torch.float32, device=device).index_add_(0, module_index, sq)
        module_norm = module_sq.sqrt()
        if mode == "per_param":
            scales = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
        else:
            scales = torch.clamp(max_norm / (module_norm + 1e-6), max=1.0)[module_index]
        self._apply(grads, present, scales)
        return {"grad_norm_backbone": module_norm[0], "grad_norm_head": module_norm[1]}

    def _on_device(self, device, present):
        """Index tensors reused across steps (no host-to-device copy per step)."""
        key = (str(device), present)
        if key not in self._index_cache:
            value = self.module_index if present is None else torch.tensor(present)
            self._index_cache[key] = value.to(device)
        return self._index_cache[key]

    def _apply(self, grads, present, scales) -> None:
        if not present:
            return
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_grad

            for i in present:
                safe_set_local_grad(self.params[i][1], grads[i] * scales[i])
            return
        torch._foreach_mul_([grads[i] for i in present], [scales[i].to(grads[i].dtype) for i in present])


class DeepSpeedRuntime:
    """The runtime interface of :mod:`.local` on a DeepSpeed engine."""

    name = "deepspeed"

    def __init__(self, cfg, model, device: torch.device, world_size: int):
        check_deepspeed_request(cfg)
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel("WARNING")
        self.cfg, self.model, self.device = cfg, model, device
        self.stage = cfg.runtime.zero_stage
        ensure_process_group(device)
        if self.stage == 3:
            for p in _vit_direct_parameters(model):
                deepspeed.zero.register_external_parameter(model, p)
        student = model.student
        self.param_groups = build_param_groups(cfg, student["backbone"], student["head"])
        self.optimizer = build_optimizer(cfg, self.param_groups)  # receives the schedule every step
        buffers = {name: b.dtype for name, b in model.named_buffers()}
        if dist.get_rank() == 0:  # DeepSpeed may JIT-build an op now; a stale lock would hang it
            warn_stale_build_locks()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(cfg, world_size, device),
            dist_init_required=False,
        )
        # bf16 mode casts every floating tensor of the module; the DINO centers stay fp32.
        for name, b in model.named_buffers():
            if b.is_floating_point() and b.dtype != buffers[name]:
                b.data = b.data.to(buffers[name])
        self.module = self.engine
        self.compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        student_params = dict(model.student.named_parameters())
        self.pairs = [(name, t, student_params[name]) for name, t in model.teacher.named_parameters()]
        self.ema = self._build_ema()
        self.clipper = ShardedGradClipper(model.student, self.stage)
        self._last_tag: Optional[str] = None

    def _build_ema(self, teacher_init: Optional[Dict[str, torch.Tensor]] = None):
        kind = self.cfg.runtime.kernels.ema
        if self.stage == 3:
            return ZeroPartitionEMA(self.pairs, kind, teacher_init)
        return ZeroFragmentEMA(self.pairs, kind, teacher_init)

    # ---------------------------------------------------------------------------------- step
    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Images in the parameters' dtype (DeepSpeed bf16 has no autocast)."""
        if self.compute_dtype == torch.float32:
            return batch
        return {k: (v.to(self.compute_dtype) if k.endswith("_crops") and torch.is_tensor(v) else v)
                for k, v in batch.items()}

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, freeze_last_layer: bool = False) -> Dict[str, torch.Tensor]:
        if freeze_last_layer:  # refused at construction; kept as a guard
            raise DistributedConfigError("the DINO prototype freeze is not supported under DeepSpeed")
        o = self.cfg.optim
        norms: Dict[str, torch.Tensor] = {}
        if o.clip_grad > 0:
            norms = self.clipper.clip(o.clip_mode, o.clip_grad, self.device)  # module norms before clipping
        self.engine.step()
        return norms

    def ema_update(self, momentum: float) -> None:
        self.ema.update(momentum)

    # ---------------------------------------------------------------------------- checkpoints
    @torch.no_grad()
    def full_student(self) -> Dict[str, torch.Tensor]:
        """Consolidated fp32 student weights (name -> tensor) on every rank. Collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.model.student.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # frozen (or no master): the model copy is the value
                ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
                with ctx:
                    full = p.detach().float()
            out[name] = full.detach().float().clone().cpu()
        return out

    def eval_teacher_backbone(self) -> torch.nn.Module:
        """A stand-alone fp32 copy of the whole teacher backbone, for evaluation and plots. The engine's
        own teacher cannot serve: under bf16 its weights are bf16 copies, and under ZeRO-3 each rank
        holds only its partition. Collective: every rank must call it."""
        from flashdino.engine.eval.backbone import eval_attention
        from flashdino.engine.models import build_backbone

        prefix = "backbone."
        weights = {k[len(prefix):]: v for k, v in self.ema.full_teacher().items() if k.startswith(prefix)}
        backbone = build_backbone(self.cfg.model, teacher=True, attention=eval_attention(self.cfg, self.device))
        backbone.load_state_dict(weights, strict=True)
        return backbone.to(device=self.device, dtype=torch.float32).eval()

    def state_dict(self) -> Dict[str, Any]:
        """Consolidated weights (for evaluation, export and the teacher masters on resume). The optimizer
        state lives in the DeepSpeed shard files named by ``save_shards``. Collective."""
        model = self.model
        return {
            "student": self.full_student(),
            "teacher": {k: v.cpu() for k, v in self.ema.full_teacher().items()},
            "buffers": {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                        for k, v in model.named_buffers() if not k.startswith(("student.", "teacher."))},
            "zero_stage": self.stage,
        }

    def save_shards(self, output_dir: str, step: int) -> Dict[str, Any]:
        tag = f"step{step}"
        self.engine.save_checkpoint(os.path.join(output_dir, SHARD_DIR), tag=tag, client_state={}, save_latest=False)
        self._last_tag = tag
        return {"dir": SHARD_DIR, "tag": tag, "zero_stage": self.stage}

    def load_state_dict(self, state: Dict[str, Any], output_dir: Optional[str] = None) -> None:
        shards = state.get("shards")
        if not shards:
            raise RuntimeError("this checkpoint has no DeepSpeed shards; it was not written by the DeepSpeed runtime")
        if shards.get("zero_stage", self.stage) != self.stage:
            raise RuntimeError(f"checkpoint was written with ZeRO stage {shards['zero_stage']}, this run uses "
                               f"runtime.zero_stage={self.stage}; resume with the same stage")
        path = os.path.join(output_dir, shards["dir"])
        loaded, _ = self.engine.load_checkpoint(path, tag=shards["tag"], load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load its shards from {os.path.join(path, shards['tag'])}")
        self.ema = self._build_ema(teacher_init=state["teacher"])  # views into the reloaded masters
        for name, value in state.get("buffers", {}).items():
            getattr(self.model, name).copy_(value)

    def prune_shards(self, output_dir: str) -> None:
        """Delete shard tags no checkpoint file refers to (after a new checkpoint.pth was written)."""
        keep = {self._last_tag} | {f"step{step}" for step, _ in step_checkpoints(output_dir)}
        for path in glob.glob(os.path.join(output_dir, SHARD_DIR, "step*")):
            tag = os.path.basename(path)
            if _TAG_RE.match(tag) and tag not in keep and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
