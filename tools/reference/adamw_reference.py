#!/usr/bin/env python3
"""Reference data for molt's optimizer and schedule tests (tests/test_optim.c).

Writes tests/fixtures/train/adamw.json with:
  adamw: cases, each with its hyperparameters (betas, eps, weight_decay), the initial
         float32 parameters (two tensors), the float32 gradients and learning rate of every
         step, and the parameters after each step of torch.optim.AdamW (single-tensor CPU
         path, foreach=False).
  clip:  cases of float32 gradients (three tensors), max_norm, the total norm returned by
         torch.nn.utils.clip_grad_norm_ and the clipped gradients.
  schedules: the learning rates given by transformers' get_constant_schedule_with_warmup,
         get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup (through
         torch's LambdaLR) at every step of a run longer than num_training_steps.

Every float is written with Python's repr, which round-trips, so the C test reads the exact
float32 values torch produced. Run from the repository root:
  /work/venv-ref/bin/python tools/reference/adamw_reference.py
"""
import json

import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

OUT = "tests/fixtures/train/adamw.json"
SIZES = [7, 13]  # two parameters of sizes that are not multiples of a vector width


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def adamw_case(seed, betas, eps, weight_decay, lrs):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float32))
              for n in SIZES]
    init = [flat(p) for p in params]
    opt = torch.optim.AdamW(params, lr=lrs[0], betas=betas, eps=eps,
                            weight_decay=weight_decay, foreach=False)
    steps = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(n, generator=g, dtype=torch.float32) * 0.1 for n in SIZES]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        steps.append({"lr": lr, "grads": [flat(x) for x in grads],
                      "params": [flat(p) for p in params]})
    return {"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay,
            "init": init, "steps": steps}


def clip_case(seed, max_norm, scale):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g, dtype=torch.float32) * scale for n in (5, 11, 3)]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return {"max_norm": max_norm, "grads": [flat(x) for x in grads],
            "total_norm": float(total), "clipped": [flat(p.grad) for p in params]}


def schedule_lrs(make, n):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    sched = make(opt)
    lrs = []
    for _ in range(n):
        lrs.append(sched.get_last_lr()[0])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    return lrs


def main():
    torch.manual_seed(0)
    lrs = [1e-3 * (0.5 + 0.1 * i) for i in range(8)]
    out = {
        "adamw": [
            adamw_case(1, (0.9, 0.999), 1e-8, 0.01, lrs),
            adamw_case(2, (0.8, 0.95), 1e-6, 0.1, [3e-2] * 6),
            adamw_case(3, (0.9, 0.999), 1e-8, 0.0, [5e-4] * 4),
        ],
        "clip": [clip_case(4, 1.0, 1.0), clip_case(5, 100.0, 1.0), clip_case(6, 0.02, 1e-2)],
        "schedules": {
            "lr_max": 3e-4, "warmup_steps": 5, "total_steps": 30,
            "constant": schedule_lrs(lambda o: get_constant_schedule_with_warmup(o, 5), 34),
            "linear": schedule_lrs(lambda o: get_linear_schedule_with_warmup(o, 5, 30), 34),
            "cosine": schedule_lrs(lambda o: get_cosine_schedule_with_warmup(o, 5, 30), 34),
        },
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
