#!/usr/bin/env python3
"""Reference NF4 / FP8 data for molt's quantized-weight tests (tests/test_quant.c).

Writes tests/fixtures/quant/quant_ref.safetensors. For every case NAME (a fixed random or
hand-built float32 tensor):
  NAME.x             the float32 input, shape [out, in] or [E, out, in]
  NAME.packed        bitsandbytes quantize_4bit(x, blocksize=64, quant_type="nf4",
                     compress_statistics=True) packed bytes, flattened (U8)
  NAME.absmax_q      the double-quantized absmax codes (state.absmax, U8)
  NAME.absmax2       the second-level fp32 scales (state.state2.absmax)
  NAME.offset        state.offset (F32, one element)
  NAME.absmax        the plain fp32 absmax of compress_statistics=False (same packed bytes)
  NAME.deq           dequantize_4bit of the double-quantized state (F32, small cases only)
  NAME.deq_plain     dequantize_4bit of the plain state (F32, small cases only)
and once:
  dynamic_map        state.state2.code: bitsandbytes' signed 8-bit dynamic map (F32 [256])
  sum.x, sum.len, sum.value   float32 data, prefix lengths and torch.sum of each prefix
                     (F32, I64, F32): the order torch adds float32 numbers in, which the
                     offset = absmax.mean() depends on
  fp8.x, fp8.code    float32 values in [-448, 448] and their torch.float8_e4m3fn bytes (U8)

Everything runs on the CPU. bitsandbytes' CPU backend quantizes the 4-bit codes with torch
(the "default" kernel: midpoints + bucketize) and the absmax codes with its native CPU
library (a 65536-entry lookup table); the script asserts the native library is loaded so the
fixture is what a CPU user of bitsandbytes gets.

Run from the repository root with a virtualenv outside the repository that has torch and
bitsandbytes (see tools/reference/README_quant.md):
  /work/venv-ref/bin/python tools/reference/nf4_parity.py
"""
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import bitsandbytes.functional as F
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "quant" / "quant_ref.safetensors"
SEED = 20250611
SMALL = 20000  # cases with at most this many elements also carry the dequantized tensors

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def edge_case():
    """[5, 64]: a zero block, values exactly on the fp32 NF4 midpoints (ties), +-absmax and
    tiny values, a block with a negative absmax, and a random block."""
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.zeros(5, 64)
    mids = (NF4[:-1] + NF4[1:]) / 2
    x[1, :15] = mids
    x[1, 15:30] = -mids
    x[1, 30] = 1.0  # absmax 1: the midpoints scale to themselves
    x[2, :8] = torch.tensor([3.0, -3.0, 1e-30, -1e-30, 0.0, 1.5, -1.5, 2.9999998])
    x[3] = torch.randn(64, generator=g) * 0.01
    x[3, 17] = -0.5
    x[4] = torch.randn(64, generator=g)
    return x


def flat_case():
    """[8, 64]: every block has absmax 1, so absmax - offset is all zero (a zero group)."""
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.rand(8, 64, generator=g) * 0.9
    x[:, 5] = 1.0
    return x


def cases():
    g = torch.Generator().manual_seed(SEED)
    yield "w64x64", torch.randn(64, 64, generator=g) * 0.02
    yield "w96x200", torch.randn(96, 200, generator=g) * 0.05
    yield "w33x7", torch.randn(33, 7, generator=g)  # odd count: padded nibble, partial block
    yield "e3x5x100", torch.randn(3, 5, 100, generator=g) * 0.1  # experts [E, out, in]
    t = torch.randn(128, 512, generator=g) * 0.03  # 1024 blocks: 4 absmax groups
    t[7, :64] *= 40  # an outlier block
    yield "w128x512", t
    yield "edge", edge_case()
    yield "flat", flat_case()


def quantize(x):
    q, st = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    qp, sp = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(q, qp), "packed bytes differ with and without double quantization"
    assert st.state2.blocksize == 256 and st.blocksize == 64
    out = {
        "packed": q.reshape(-1).contiguous(),
        "absmax_q": st.absmax.reshape(-1).contiguous(),
        "absmax2": st.state2.absmax.reshape(-1).float().contiguous(),
        "offset": st.offset.reshape(1).float().contiguous(),
        "absmax": sp.absmax.reshape(-1).float().contiguous(),
    }
    if x.numel() <= SMALL:
        out["deq"] = F.dequantize_4bit(q, st).reshape(x.shape).float().contiguous()
        out["deq_plain"] = F.dequantize_4bit(qp, sp).reshape(x.shape).float().contiguous()
    return out, st.state2.code.float().contiguous()


def sum_data():
    g = torch.Generator().manual_seed(SEED + 3)
    x = (torch.rand(24000, generator=g) * 3).float()
    lens = list(range(1, 41)) + [63, 64, 100, 257, 1000, 4095, 4096, 8192, 8193, 16385,
                                 20000, 24000]
    vals = [x[:n].sum() for n in lens]
    return x, torch.tensor(lens, dtype=torch.int64), torch.stack(vals).float()


def fp8_data():
    g = torch.Generator().manual_seed(SEED + 4)
    mag = torch.exp2(torch.rand(3000, generator=g) * 22 - 13)  # 2^-13 .. 2^9
    sign = torch.where(torch.rand(3000, generator=g) < 0.5, -1.0, 1.0)
    x = torch.clamp(mag * sign, -448, 448)
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties between neighbouring codes
    x = torch.cat([x, mids[(mids.abs() <= 448)], torch.tensor([0.0, -0.0, 448.0, -448.0])])
    code = x.to(torch.float8_e4m3fn).view(torch.uint8)
    return x.float().contiguous(), code.contiguous()


def main():
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        sys.exit("bitsandbytes' native CPU library did not load; the fixture would not be "
                 "what bitsandbytes computes on a CPU")
    torch.set_num_threads(1)  # torch's float32 sums split over threads past 32768 elements
    tensors, dyn = {}, None
    for name, x in cases():
        x = x.float().contiguous()
        out, code = quantize(x)
        tensors[f"{name}.x"] = x
        for k, v in out.items():
            tensors[f"{name}.{k}"] = v
        assert dyn is None or torch.equal(dyn, code)
        dyn = code
    tensors["dynamic_map"] = dyn
    tensors["sum.x"], tensors["sum.len"], tensors["sum.value"] = sum_data()
    tensors["fp8.x"], tensors["fp8.code"] = fp8_data()
    meta = {
        "made_by": "tools/reference/nf4_parity.py",
        "seed": str(SEED),
        "python": platform.python_version(),
        "torch": version("torch"),
        "bitsandbytes": version("bitsandbytes"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(tensors)} tensors, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
