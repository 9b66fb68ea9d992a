"""Inference: the pruned model as the fast model that ships (``deploy``), its layers and the ``winoprune::`` ops.

* :func:`deploy`: fold BatchNorms, fuse activations and route every conv to its fastest accurate kernel.
* :class:`PackedWinogradConv`, :class:`PackedWinogradConvBf16`, :class:`PackedDepthwiseConv`, :class:`DenseConv`:
  the deployed layers (state in buffers; traceable, compilable, exportable); ``deploy(..., precision="bf16")``
  allows the bfloat16 ones (:class:`Precision`) and returns a :class:`Bf16Model`.
* :func:`export_deployed`, :func:`save_deployed`, :func:`load_deployed`: the deployed model as a checked ``.pt2``
  (dynamic batch, or H and W too, as ``deploy(..., dynamic=...)`` chose: :class:`DeployShapes`); a bad file is a
  one-line :class:`DeployArtifactError`.
* :func:`keep_freed_memory`: a memory arena for the process (no page faults on large activations).
* The seven ``winoprune::`` torch custom ops (``winograd_conv``, ``winograd_conv_bf16``, ``depthwise_conv``,
  ``conv2d_act``, ``conv2d_act_bf16``, ``conv1x1_act``, ``max_pool2d``), registered when this package is imported.
"""

from lightning_winoprune.deploy._artifact import DeployArtifactError, export_deployed, load_deployed, save_deployed
from lightning_winoprune.deploy._deploy import (
    DeployMismatchError,
    DeployReport,
    DeployRoute,
    LayerRoute,
    Precision,
    deploy,
)
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
from lightning_winoprune.deploy._packed_bf16 import Bf16Model, PackedWinogradConvBf16
from lightning_winoprune.deploy._shapes import DeployShapes

__all__ = [
    "Activation",
    "Bf16Model",
    "DenseConv",
    "DenseRoute",
    "DeployArtifactError",
    "DeployMismatchError",
    "DeployReport",
    "DeployRoute",
    "DeployShapes",
    "LayerRoute",
    "NativeMaxPool2d",
    "PackedDepthwiseConv",
    "PackedWinogradConv",
    "PackedWinogradConvBf16",
    "Precision",
    "SparseForm",
    "deploy",
    "export_deployed",
    "keep_freed_memory",
    "load_deployed",
    "save_deployed",
]
