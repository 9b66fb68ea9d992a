"""Winograd-domain building blocks: transforms, the trainable :class:`WinogradConv2d` layer and model conversion."""

from lightning_winoprune.winograd._convert import LayerDecision, WinogradizeReport, iter_winograd_layers, winogradize
from lightning_winoprune.winograd._layer import Route, WinogradConv2d, conv_ineligibility, winograd_layout
from lightning_winoprune.winograd._tiles import (
    TileGeometry,
    filter_transform,
    input_transform,
    input_transform_adjoint,
    output_transform,
    output_transform_adjoint,
    tile_geometry,
)
from lightning_winoprune.winograd._transforms import (
    INTERPOLATION_POINTS,
    SUPPORTED_M,
    WinogradTransforms,
    get_transforms,
    toom_cook,
)

__all__ = [
    "INTERPOLATION_POINTS",
    "SUPPORTED_M",
    "LayerDecision",
    "Route",
    "TileGeometry",
    "WinogradConv2d",
    "WinogradTransforms",
    "WinogradizeReport",
    "conv_ineligibility",
    "filter_transform",
    "get_transforms",
    "input_transform",
    "input_transform_adjoint",
    "iter_winograd_layers",
    "output_transform",
    "output_transform_adjoint",
    "tile_geometry",
    "toom_cook",
    "winograd_layout",
    "winogradize",
]
