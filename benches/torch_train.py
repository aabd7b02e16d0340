#!/usr/bin/env python3
"""PyTorch on the network of `train_bench`: 128 -> 256 -> 128 -> 1, batch 512, Adam, one thread.
Prints samples per second. Run by benches/run.sh after train_bench, in the same run."""
import json
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(128, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 128), torch.nn.ReLU(),
    torch.nn.Linear(128, 1),
)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.BCEWithLogitsLoss()
x = torch.rand(16384, 128) * 4 - 2
y = (torch.rand(16384, 1) < 0.25).float()


def epoch():
    for i in range(0, x.shape[0], 512):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[i:i + 512]), y[i:i + 512])
        loss.backward()
        opt.step()


epoch()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < 5.0:
    epoch()
    n += x.shape[0]
rate = n / (time.perf_counter() - start)
print(json.dumps({"peer": "pytorch", "version": torch.__version__, "threads": 1, "samples_per_second": rate}))
