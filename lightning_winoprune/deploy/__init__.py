"""Inference: the pruned model as the fast model that ships (``deploy``), its layers and the ``winoprune::`` ops.

* :func:`deploy`: fold BatchNorms, fuse activations and route every conv to its fastest accurate kernel.
* :class:`PackedWinogradConv`, :class:`PackedDepthwiseConv`, :class:`DenseConv`: the deployed layers (state in
  buffers; traceable, compilable, exportable).
* :func:`keep_freed_memory`: a memory arena for the process (no page faults on large activations).
* The ``winoprune::winograd_conv``, ``winoprune::depthwise_conv`` and ``winoprune::conv2d_act`` torch custom ops,
  registered when this package is imported.
"""

from lightning_winoprune.deploy._deploy import DeployMismatchError, DeployReport, LayerRoute, deploy
from lightning_winoprune.deploy._memory import keep_freed_memory
from lightning_winoprune.deploy._ops import Activation
from lightning_winoprune.deploy._packed import (
    DenseConv,
    DenseRoute,
    NativeMaxPool2d,
    PackedDepthwiseConv,
    PackedWinogradConv,
    SparseForm,
)

__all__ = [
    "Activation",
    "DenseConv",
    "DenseRoute",
    "DeployMismatchError",
    "DeployReport",
    "LayerRoute",
    "NativeMaxPool2d",
    "PackedDepthwiseConv",
    "PackedWinogradConv",
    "SparseForm",
    "deploy",
    "keep_freed_memory",
]
