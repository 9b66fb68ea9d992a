"""DEPrune accuracy on scikit-learn's bundled digits: mobilenetv2_100 dense vs DEPrune, -B, -BH and channel pruning.

The model is trained dense once. Then, for each depthwise ratio (DW) and pointwise ratio (PW), a copy is pruned
one-shot by the ``DEPrune`` callback with ``dcp`` (DEPrune), ``dcp-b`` (DEPrune-B), ``dcp-bh`` (DEPrune-BH, u/o per
layer chosen by importance) and ``channel`` (whole depthwise channels at the same ratio: the channel-pruning
baseline the paper compares against), and fine-tuned for the same number of epochs. One table: accuracy right after
pruning and after fine-tuning, the drop from dense, the real-DW ratio (mean and minimum over layers of the smallest
sub-GEMM pruning ratio, the paper's Table 2) and the u/o pattern per depthwise layer.

    python benchmarks/bench_deprune_accuracy.py [--epochs 6] [--finetune 2] [--json out.json]
    python benchmarks/bench_deprune_accuracy.py --dw 0.7 --pw 0.3 --precision bf16-mixed   # Trainer(precision=...)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import PRECISION, add_precision_argument, finetune_copy, quiet, train_dense
from rich.table import Table

from lightning_winoprune import DEPrune
from lightning_winoprune.pruning import dr_column_masks

NAMES = {"dcp": "DEPrune", "dcp-b": "DEPrune-B", "dcp-bh": "DEPrune-BH", "channel": "channel pruning"}


def real_dw(module: torch.nn.Module, cb: DEPrune, tile: int) -> list[float]:
    """Per depthwise layer: the smallest pruning ratio over its DR sub-GEMMs."""
    out = []
    for name, kind in cb.kinds.items():
        if kind == "dw":
            keeps = dr_column_masks(module.get_submodule(name).weight_mask, tile)
            out.append(min(float((~k).float().mean()) for k in keeps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    ap.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after pruning (same for every run)")
    ap.add_argument("--dw", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--pw", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(NAMES))
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dense model's initialisation and batch order")
    add_precision_argument(ap)
    args = ap.parse_args()
    PRECISION["value"] = args.precision
    console = quiet()
    dense, data, dense_acc = train_dense(args.model, args.image_size, args.epochs, console, args.seed)

    rows = []
    for dw in args.dw:
        for pw in args.pw:
            for method in args.methods:
                cb = DEPrune(method=method, dw_amount=dw, pw_amount=pw, tile=args.tile, verbose=0,
                             calibration_batches=4)
                t0 = time.perf_counter()
                module, acc_pruned, acc = finetune_copy(dense, data, cb, args.finetune)
                rdw = real_dw(module, cb, args.tile)
                pattern = "".join({"down": "u", "up": "o"}[cb.dw_rounding[n]] for n, k in cb.kinds.items()
                                  if k == "dw") if method == "dcp-bh" else "-"
                hist = cb.history[-1]
                rows.append({"dw": dw, "pw": pw, "method": method, "dw_sparsity": hist.get("dw_sparsity", 0.0),
                             "pw_sparsity": hist.get("pw_sparsity", 0.0), "acc_pruned": acc_pruned,
                             "acc_finetuned": acc, "drop": dense_acc - acc, "real_dw_mean": statistics.mean(rdw),
                             "real_dw_min": min(rdw), "pattern": pattern, "seconds": time.perf_counter() - t0})
                console.print(f"  DW {dw:.0%} PW {pw:.0%} {NAMES[method]:15}: pruned {acc_pruned:.4f} -> "
                              f"fine-tuned {acc:.4f}, real DW mean {statistics.mean(rdw):.3f}")

    table = Table(title=f"{args.model} on digits ({args.precision}): dense test accuracy {dense_acc:.4f}, "
                        f"fine-tuning {args.finetune} epochs per run, tile {args.tile}")
    for col in ("DW", "PW", "method", "DW sparsity", "acc. after pruning", "acc. fine-tuned", "drop",
                "real DW mean/min", "DW-Pat. per layer"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['dw']:.0%}", f"{r['pw']:.0%}", NAMES[r["method"]], f"{r['dw_sparsity']:.3f}",
                      f"{r['acc_pruned']:.4f}", f"{r['acc_finetuned']:.4f}", f"{r['drop']:+.4f}",
                      f"{r['real_dw_mean']:.3f}/{r['real_dw_min']:.3f}", r["pattern"])
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "dense_acc": dense_acc, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
