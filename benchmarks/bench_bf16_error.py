"""How much bfloat16 costs a 3x3 conv, direct and in the Winograd domain: why ``WinogradConv2d`` stays float32.

Under ``Trainer(precision="bf16-mixed")`` (CPU autocast to bfloat16) a plain conv computes in bfloat16. For each
ResNet-like layer shape this prints the relative max error against a float64 reference of: the direct conv in
float32 and under autocast (bfloat16), and ``WinogradConv2d`` F(2,3) / F(4,3) in float32 and with its weights and
input in bfloat16 (what it would compute if it followed autocast). The Winograd transforms amplify the rounding of
their bfloat16 inputs, F(4,3) most (its interpolation points reach 1/2 and 2, and its input transform sums six terms
with coefficients up to 2.5).

    python benchmarks/bench_bf16_error.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lightning_winoprune import WinogradConv2d

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, H = W): ResNet-18's stride-1 3x3 convs


def errors(channels: int, size: int, seed: int = 0) -> dict[str, float]:
    """Relative max error of each computation of one ``channels -> channels`` 3x3 conv on a ``size`` map."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).double()
    x = torch.randn(1, channels, size, size, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
        w, b, xf = conv.weight.float(), conv.bias.float(), x.float()

        def rel(y: torch.Tensor) -> float:
            return float((y.double() - ref).abs().max() / ref.abs().max())

        out = {"direct f32": rel(F.conv2d(xf, w, b, padding=1))}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["direct bf16"] = rel(F.conv2d(xf, w, b, padding=1))
        for m in (2, 4):
            layer = WinogradConv2d.from_conv(conv.float(), m=m)
            out[f"F({m},3) f32"] = rel(layer(xf))
            out[f"F({m},3) bf16"] = rel(layer.bfloat16()(x.bfloat16()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()
    rows = [{"shape": f"{c}->{c} {s}x{s}", **errors(c, s)} for c, s in SHAPES]
    cols = [k for k in rows[0] if k != "shape"]
    print("relative max error against float64, " + torch.__version__)
    print("| shape | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['shape']} | " + " | ".join(f"{row[c]:.1e}" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
