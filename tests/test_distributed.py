"""fused_rnn.LSTM under DistributedDataParallel (gloo, 2 CPU processes) gets the gradients of a
single-process run on the whole batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_rnn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fused_rnn.LSTM(3, 5, num_layers=2, bidirectional=True, backend="torch")
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).mean()


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, 3, generator=g, dtype=torch.float64)       # [T, B=4, I]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Model().double())
    x = data()[:, rank * 2:(rank + 1) * 2]                                # each rank takes half the batch
    model(x).backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.module.named_parameters()}, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp_grads = torch.load(out)

    torch.manual_seed(0)
    model = Model().double()
    x = data()
    # DDP averages the two ranks' gradients of the per-half mean losses
    ((model(x[:, :2]) + model(x[:, 2:])) / 2).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[k], p.grad, rtol=1e-12, atol=1e-12)
