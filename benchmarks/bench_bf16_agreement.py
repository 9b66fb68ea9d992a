"""How far a trained pruned model moves when deployed in bfloat16: error and top-1 agreement on held-out digits.

Takes the best checkpoint of the main job (``winoprune fit --config resnet18_abwsp``: ResNet-18, ABWSP 70%, F(2,3),
trained on the embedded digits at 32x32), rebuilds the pruned model with ``load_pruned_checkpoint``, deploys it in
float32 and with ``precision="bf16"`` (routes fixed by the rule: no timing), and runs the whole test split through
the model as trained and both deployed models. It prints the accuracy of each, the bfloat16 model's top-1
agreement with the float32 one and its relative max error on the logits. Needs a CPU with bfloat16 kernels
(AVX512-BF16 or AMX).

    winoprune fit --config resnet18_abwsp                       # writes runs/resnet18_abwsp/.../pruned-*.ckpt
    python benchmarks/bench_bf16_agreement.py --ckpt runs/resnet18_abwsp/winoprune/<run>/checkpoints/<best>.ckpt
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

import lightning_winoprune as lw
from lightning_winoprune.data import DigitsDataModule
from lightning_winoprune.deploy._packed_bf16 import bf16_refusal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint of the resnet18_abwsp recipe")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    refusal = bf16_refusal()
    if refusal is not None:
        sys.exit(f"bench_bf16_agreement: {refusal}")
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    lw.load_pruned_checkpoint(model, args.ckpt, prefix="model.").eval()
    data = DigitsDataModule(image_size=args.image_size, in_chans=1, batch_size=512)
    data.setup("test")
    xs, ys = map(torch.cat, zip(*data.test_dataloader(), strict=True))
    calibration = xs[:64]
    opts = {"tune": False, "verbose": False, "time_model": False}
    fp32 = lw.deploy(model, calibration, **opts)
    bf16 = lw.deploy(model, calibration, precision="bf16", **opts)
    with torch.no_grad():
        ref, out32, out16 = model(xs), fp32(xs), bf16(xs)
    acc = {name: float((o.argmax(1) == ys).float().mean()) for name, o in
           (("as trained", ref), ("deployed float32", out32), ("deployed bfloat16", out16))}
    agree = float((out16.argmax(1) == ref.argmax(1)).float().mean())
    err = float((out16 - ref).abs().max() / ref.abs().max())
    print(f"{len(ys)} test digits, {args.image_size}x{args.image_size}; torch {torch.__version__}; "
          f"bfloat16 kernels: {lw.kernels.native_bf16_path()}")
    for name, value in acc.items():
        print(f"  accuracy, {name}: {value:.4f}")
    print(f"  bfloat16 vs the model as trained: top-1 agreement {agree:.4f}, relative max error {err:.1e} "
          f"(deploy's check on the 64-image calibration batch: {bf16.deploy_report.max_error:.1e}, agreement "
          f"{bf16.deploy_report.top1_agreement:.4f})")


if __name__ == "__main__":
    main()
