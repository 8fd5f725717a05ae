"""flashdino.profiling: the harnesses that check the engine's speed and numerics.

| module | job |
|---|---|
| `ranges` | named step phases (NVTX + torch.profiler ranges) and `PhaseTimer` (CUDA events / wall clock) |
| `harness` | engine and reference eager trainers from one config, shared init, synthetic or real batches |
| `bench` | `flashdino bench`: images/s, step-time stats, MFU, memory, warm-up, phases, speedup, guard |
| `parity` | `flashdino parity`: per-step losses, grad norms, parameter errors vs the reference |
| `profile` | `flashdino profile`: torch.profiler trace, top kernels, nsys mode |
| `flops`, `ceilings`, `timing`, `env` | FLOP counting and peaks, same-run ceilings, step clocks, run metadata |
| `regression` | compare a bench JSON with a baseline, flag a drop > 5% |
| `report` | the latest-results table for the README |
| `suite` | the standard measurement set for a GPU session |
| `kernel_bench` | Triton kernels vs eager references (`flashdino bench --kernels`) |
"""
