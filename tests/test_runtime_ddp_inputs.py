"""DDP leaves the step's inputs where the trainer put them (spec T12: no per-step host sync).

With ``device_ids`` DDP would copy the teacher temperature, a 0-d CPU tensor, to the GPU with a
blocking copy, and the loss would read it back on the host. Needs a GPU: on the CPU DDP never moves
inputs, with or without device ids.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from flashdino.engine.runtime.ddp import wrap_ddp

from _ranks import free_port


class _RecordsInputDevices(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.seen = None

    def forward(self, x, teacher_temp):
        self.seen = (x.device.type, teacher_temp.device.type)
        return self.linear(x).sum() / teacher_temp


@pytest.mark.gpu
def test_ddp_keeps_the_cpu_teacher_temperature_on_the_host():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        module = _RecordsInputDevices().cuda()
        ddp = wrap_ddp(module)
        loss = ddp(torch.randn(2, 4, device="cuda"), teacher_temp=torch.tensor(0.04))
        loss.backward()
        assert module.seen == ("cuda", "cpu")
        assert module.linear.weight.grad is not None and module.linear.weight.grad.is_cuda
    finally:
        dist.destroy_process_group()
