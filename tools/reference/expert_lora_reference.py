#!/usr/bin/env python3
"""Reference data for LoRA on routed experts (tests/test_ops_moe_lora.c).

Builds transformers' Mistral4Experts (the routed experts of Mistral Small 4, weights stored
as 3D parameters gate_up_proj [E, 2I, H] and down_proj [E, H, I]) inside a tiny module tree
mlp.experts, wraps it with PEFT through LoraConfig(target_parameters=[...]) on both expert
parameters, makes every lora_B nonzero (seeded), runs one float64 forward with a fixed
routing and backpropagates a fixed random cotangent. Writes
tests/fixtures/expert_lora/expert_lora_ref.safetensors holding:
  x [T, H], routing.weights [T, k], routing.idx [T, k] (I32), gate_up_proj, down_proj,
  the four LoRA matrices under their PEFT parameter names (see the metadata keys
  name.gate_up.lora_A etc.), y [T, H] (the PEFT forward), dy [T, H] (the cotangent), and the
  gradients grad.x, grad.weights, grad.<PEFT name> of each LoRA matrix.
Metadata: sizes, r, lora_alpha, scaling, the PEFT names and the package versions.

Run from the repository root with a virtualenv outside the repository that has torch,
transformers, peft and safetensors (see tools/reference/README_expert_lora.md):
  /work/venv-ref/bin/python tools/reference/expert_lora_reference.py
"""
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers.models.mistral4.configuration_mistral4 import Mistral4Config
from transformers.models.mistral4.modeling_mistral4 import Mistral4Experts

SEED = 1234
T, H, I, E, K, R, ALPHA = 7, 6, 5, 4, 2, 2, 3
# Expert 2 gets no token; expert 1 is chosen by most tokens.
IDX = [[1, 0], [3, 1], [1, 3], [0, 1], [3, 0], [1, 0], [0, 3]]
OUT = Path("tests/fixtures/expert_lora/expert_lora_ref.safetensors")


class Mlp(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.experts = Mistral4Experts(cfg)


class Tiny(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = Mlp(cfg)

    def forward(self, x, idx, w):
        return self.mlp.experts(x, idx, w)


def lora_params(model):
    """Maps (parameter, 'A' or 'B') to (PEFT name, tensor) for the two targeted params."""
    found = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        wrapper = model.get_submodule(name.rsplit(".lora_", 1)[0])
        which = "A" if ".lora_A." in name else "B"
        found[(wrapper.parameter_name, which)] = (name, p)
    return found


def main():
    torch.manual_seed(SEED)
    cfg = Mistral4Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                         num_experts_per_tok=K, hidden_act="silu")
    cfg.num_local_experts = E
    cfg._experts_implementation = "eager"
    model = Tiny(cfg).double()
    with torch.no_grad():
        model.mlp.experts.gate_up_proj.normal_(0.0, 0.5)
        model.mlp.experts.down_proj.normal_(0.0, 0.5)
    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, lcfg)
    found = lora_params(peft_model)
    assert len(found) == 4, sorted(found)
    with torch.no_grad():
        for (pname, which), (_, p) in sorted(found.items()):
            if which == "B":  # PEFT initializes B to zero: make the adapter do something
                p.normal_(0.0, 0.3)
            else:
                p.mul_(2.0)

    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(T, K, dtype=torch.float64) + 0.2).requires_grad_(True)
    idx = torch.tensor(IDX, dtype=torch.int64)
    y = peft_model(x, idx, w)
    dy = torch.randn(T, H, dtype=torch.float64)
    y.backward(dy)

    base = model.mlp.experts
    while hasattr(base, "base_layer"):
        base = base.base_layer
    tensors = {
        "x": x.detach(), "routing.weights": w.detach(),
        "routing.idx": idx.to(torch.int32), "y": y.detach(), "dy": dy,
        "grad.x": x.grad, "grad.weights": w.grad,
    }
    for pname in ("gate_up_proj", "down_proj"):
        tensors[pname] = getattr(base, pname).detach()
    meta = {
        "seed": str(SEED), "T": str(T), "H": str(H), "I": str(I), "E": str(E), "k": str(K),
        "r": str(R), "lora_alpha": str(ALPHA), "scaling": repr(ALPHA / R),
        "use_rslora": "false", "python": platform.python_version(),
        "torch": version("torch"), "transformers": version("transformers"),
        "peft": version("peft"), "safetensors": version("safetensors"),
    }
    for (pname, which), (name, p) in found.items():
        key = "gate_up" if pname == "gate_up_proj" else "down"
        tensors[name] = p.detach()
        tensors["grad." + name] = p.grad
        meta[f"name.{key}.lora_{which}"] = name
        print(f"{name}: {list(p.shape)}", file=sys.stderr)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
