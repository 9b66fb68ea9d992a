"""Per-layer latency of the bfloat16 Winograd kernels against the dense bfloat16 conv a user gets from oneDNN.

The 3x3 stride-1 layers of ResNet-18 at 224x224 (batch 1 and 8), F(2,3), BWSP 70% from the project's pruning engine
(``bwsp``: 30% of the rows kept per Winograd position) and the same with the kept rows rounded up to whole 16-row
tiles (``bwsp16``). Side by side, interleaved in one process (all of them run on torch's OpenMP pool):

* ``f32-ours``: our float32 pruned kernel (``PackedWinogradConv``), what ``deploy`` ships in float32;
* ``bf16-amx`` / ``bf16-avx512bf16``: our bfloat16 pruned kernel on each path this CPU has, on bfloat16
  channels-last activations (what a ``deploy(..., precision="bf16")`` model passes between layers);
* ``onednn-bf16-cl``: oneDNN's dense bfloat16 conv with its weight prepacked and a bfloat16 channels-last input, the
  fastest dense bfloat16 form (what OpenVINO's bfloat16 default runs per layer); it does no layout or dtype
  conversion, so it bounds what a dense bfloat16 pipeline pays per layer;
* ``onednn-bf16``: the same conv behind ``deploy``'s ``onednn-bf16`` route (``winoprune::conv2d_act_bf16``, bfloat16
  channels-last in and out);
* ``onednn-f32``: oneDNN's dense float32 conv, prepacked.

Medians over interleaved rounds, with warm caches (the layer alone); the ratio column is onednn-bf16-cl / ours-bf16
(> 1: our pruned layer is faster than the dense bfloat16 conv). ``--stages`` adds each stage's thread-milliseconds
of the AMX path (input transform, tile multiply, output transform).

    python benchmarks/bench_bf16_layers.py
    python benchmarks/bench_bf16_layers.py --batches 1 --stages
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lightning_winoprune.deploy import PackedWinogradConv, PackedWinogradConvBf16
from lightning_winoprune.deploy._packed_bf16 import bf16_refusal
from lightning_winoprune.pruning._methods import method_pattern, winograd_mask

LAYERS = [("layer1", 64, 56), ("layer2", 128, 28), ("layer3", 256, 14), ("layer4", 512, 7)]


def medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median ms of each function, the functions taking turns call by call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def round_rows_to_tiles(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (K, C, p, p) with the kept rows of every position rounded up to a multiple of 16 (the next rows by
    index join): the tile-aligned BWSP that fills whole AMX panels."""
    k = mask.shape[0]
    view = mask.permute(2, 3, 0, 1).reshape(-1, k, mask.shape[1]).clone()
    for xi in range(view.shape[0]):
        rows = view[xi].any(dim=1)
        want = min(k, -(-int(rows.sum()) // 16) * 16)
        for r in range(k):
            if int(rows.sum()) >= want:
                break
            if not rows[r]:
                rows[r] = True
        view[xi] = rows.unsqueeze(1).expand_as(view[xi])
    p = mask.shape[2]
    return view.reshape(p, p, k, mask.shape[1]).permute(2, 3, 0, 1).contiguous()


def nhwc_bits(x: torch.Tensor) -> np.ndarray:
    """``x`` rounded to bfloat16, as the kernel's ``(N, H, W, C)`` uint16 input."""
    return x.to(torch.bfloat16).permute(0, 2, 3, 1).contiguous().view(torch.int16).numpy().view("uint16")


def layer_fns(c: int, h: int, n: int, threads: int, gen: torch.Generator) -> tuple[dict, dict]:
    """The candidates of one layer shape, and the packed bfloat16 layers (for ``--stages``)."""
    from lightning_winoprune.kernels import _C

    x = torch.randn(n, c, h, h, generator=gen)
    u = torch.randn(c, c, 4, 4, generator=gen)
    mask = winograd_mask(u, 0.7, method_pattern("bwsp"))[0]
    masks = {"bwsp": mask, "bwsp16": round_rows_to_tiles(mask)}
    fns: dict[str, Callable[[], object]] = {}
    packed: dict[str, PackedWinogradConvBf16] = {}
    for tag, mk in masks.items():
        f32 = PackedWinogradConv(u, mk, 2, 1, backend="native", threads=threads)
        fns[f"{tag} f32-ours"] = lambda f32=f32: f32(x)
        bf = packed[tag] = PackedWinogradConvBf16(u, mk, 2, 1, threads=threads)
        out = np.zeros((n, h, h, c), np.uint16)
        args = (nhwc_bits(x), bf.plan_meta.numpy(), bf.plan_chunks.numpy(), bf.plan_A.numpy().view("uint16"), None,
                0, 1, 1, out, threads)
        for path in _C.supported_bf16_paths():
            fns[f"{tag} bf16-{path}"] = lambda args=args, path=path: _C.winograd_bf16_run(*args, path)
    w = torch.randn(c, c, 3, 3, generator=gen) * 0.05
    wb = w.to(torch.bfloat16)
    pad, st = [1, 1], [1, 1]
    xcl = x.to(torch.bfloat16, memory_format=torch.channels_last)
    packed_b = torch.ops.mkldnn._reorder_convolution_weight(wb, pad, st, [1, 1], 1, list(x.shape))
    packed_f = torch.ops.mkldnn._reorder_convolution_weight(w, pad, st, [1, 1], 1, list(x.shape))
    conv = torch.ops.mkldnn._convolution_pointwise
    fns["onednn-bf16-cl"] = lambda: conv(xcl, packed_b, None, pad, st, [1, 1], 1, "none", [], "")
    fns["onednn-bf16"] = lambda: torch.ops.winoprune.conv2d_act_bf16(xcl, wb, None, 1, 1, 1, 1, 1, 0)
    fns["onednn-f32"] = lambda: conv(x, packed_f, None, pad, st, [1, 1], 1, "none", [], "").contiguous()
    return fns, {"x": x, **packed}


def stages(bf: PackedWinogradConvBf16, x: torch.Tensor, threads: int, repeats: int) -> dict[str, float]:
    """Median thread-milliseconds of each stage on the AMX path (the best path where AMX is absent)."""
    from lightning_winoprune.kernels import _C

    out = np.zeros((x.shape[0], x.shape[2], x.shape[3], bf.out_channels), np.uint16)
    runs = [_C.winograd_bf16_profile(nhwc_bits(x), bf.plan_meta.numpy(), bf.plan_chunks.numpy(),
                                     bf.plan_A.numpy().view("uint16"), None, 0, 1, 1, out, threads)
            for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) * 1e3 for k in ("input", "gemm", "output")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--stages", action="store_true")
    args = parser.parse_args()
    refusal = bf16_refusal()
    if refusal is not None:
        sys.exit(f"bench_bf16_layers: {refusal}")
    from bench_deploy import machine_line  # the same CPU line as the whole-model benchmark

    console = Console(width=180)
    console.print(machine_line())
    console.print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    table = Table(title="ResNet-18 3x3 layers, F(2,3), BWSP 70%: ms (warm caches)")
    for col in ("layer", "batch", "candidates (ms)", "onednn-bf16-cl / best ours-bf16"):
        table.add_column(col)
    with torch.no_grad():
        for name, c, h in LAYERS:
            for n in args.batches:
                fns, packed = layer_fns(c, h, n, args.threads, gen)
                med = medians(fns, args.rounds)
                ours = min(v for k, v in med.items() if " bf16-" in k)
                cells = ", ".join(f"{k} {v:.3f}" for k, v in med.items())
                table.add_row(f"{name} {c}->{c} {h}x{h}", str(n), cells, f"{med['onednn-bf16-cl'] / ours:.2f}x")
                if args.stages:
                    for tag in ("bwsp", "bwsp16"):
                        st = stages(packed[tag], packed["x"], args.threads, 20)
                        console.print(f"{name} b{n} {tag} stages (thread-ms): " +
                                      ", ".join(f"{k} {v:.3f}" for k, v in st.items()))
    console.print(table)


if __name__ == "__main__":
    main()
