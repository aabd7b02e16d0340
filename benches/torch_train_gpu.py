#!/usr/bin/env python3
"""PyTorch on the network of `gpu_train_bench`, on one GPU: eight EmbeddingBag tables of
100,000 x 16 (sum, sparse gradients, Adagrad), two of them also wide (dim 1), deep layers
128-256-128-1 (Adam), batch 4,096, random ids with the same skew, synchronous. Prints samples
per second as JSON; without CUDA prints why and exits 0. Run by scripts/gpu-check.sh after
gpu_train_bench, in the same run.

    python3 benches/torch_train_gpu.py [SECONDS]
"""
import json
import os
import sys
import time

import torch

# TORCH_DEVICE=cpu runs it on the CPU (to check the script where there is no GPU).
where = os.environ.get("TORCH_DEVICE", "cuda:0")
if where.startswith("cuda") and not torch.cuda.is_available():
    print(json.dumps({"peer": "pytorch", "skipped": "torch.cuda.is_available() is False"}))
    sys.exit(0)
secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
dev = torch.device(where)
torch.manual_seed(0)
SLOTS, BUCKETS, DIM, BATCH = 8, 100_000, 16, 4096


class Feed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(BUCKETS, DIM, mode="sum", sparse=True) for _ in range(SLOTS))
        self.wide = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(BUCKETS, 1, mode="sum", sparse=True) for _ in range(2))
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(SLOTS * DIM, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 1))

    def forward(self, ids):
        x = torch.cat([e(ids[:, i:i + 1]) for i, e in enumerate(self.emb)], dim=1)
        wide = sum(w(ids[:, i:i + 1]) for i, w in enumerate(self.wide))
        return self.mlp(x) + wide + self.bias


model = Feed().to(dev)
sparse = list(model.emb.parameters()) + list(model.wide.parameters()) + [model.bias]
dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
sparse_opt = torch.optim.Adagrad(sparse, lr=0.05, initial_accumulator_value=0.1)
loss_fn = torch.nn.BCEWithLogitsLoss()
rows = 16 * BATCH
r = torch.randint(0, 2**62, (rows, SLOTS), device=dev)
ids = ((r % 1_000_003) * ((r >> 32) % 1_000) // 1_000) % BUCKETS
y = (torch.rand(rows, 1, device=dev) < 0.25).float()


def epoch():
    for i in range(0, rows, BATCH):
        dense_opt.zero_grad(set_to_none=True)
        sparse_opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids[i:i + BATCH]), y[i:i + BATCH])
        loss.backward()
        dense_opt.step()
        sparse_opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


epoch()
n, start = 0, time.perf_counter()
while True:
    epoch()
    n += rows
    if time.perf_counter() - start >= secs:
        break
rate = n / (time.perf_counter() - start)
print(json.dumps({"peer": "pytorch", "version": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                  "samples_per_second": round(rate)}))
