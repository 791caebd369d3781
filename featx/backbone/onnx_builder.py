"""The ONNX backbone built straight from a MobileNetV2 .h5 weights file, without TensorFlow.

Converting the Keras model with tf2onnx costs a new user 15-22 s on a 2-core machine, most of it
importing TensorFlow, building the Keras model and tracing it (#25). MobileNetV2's architecture is
fixed (keras.applications.MobileNetV2, include_top=False, pooling="avg"), so the graph is written
here with the `onnx` package's helper: each BatchNormalization (inference mode, epsilon 1e-3)
folded into the convolution before it, ReLU6 as Clip(0, 6), Keras' "same" and ZeroPadding2D
paddings as explicit (asymmetric) pads, featx's preprocessing (pixels / 127.5 - 1) in front and
the global average pooling at the end. Only the weights are read, with h5py, in the order Keras
loads a legacy .h5 file (the layers that have weights, in topological order), shapes checked.

Measured against the tf2onnx file of the ImageNet weights: largest difference 1.4e-5 on
features up to 5.7 (tests/test_onnx.py checks 1e-4 against Keras on real photos).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.errors import FeatxError

BN_EPSILON = 1e-3  # keras.applications.MobileNetV2's BatchNormalization(epsilon=1e-3)
OPSET = 13
IR_VERSION = 8  # what every onnxruntime >= 1.17 (featx[onnx]) reads
# The 17 inverted residual blocks: stride and output filters (at alpha 1) of each; block 0 has no
# expansion layer.
BLOCK_STRIDES = (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1)
BLOCK_FILTERS = (16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """keras.applications.mobilenet_v2._make_divisible: the widths of a given alpha."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def read_weights(path: str | Path) -> list[dict[str, np.ndarray]]:
    """The weights of each layer that has any, in the file's (topological) order: a dict per
    layer, keyed by the weight's short name ("kernel", "gamma", "moving_mean", ...)."""
    import h5py

    layers = []
    with h5py.File(path, "r") as f:
        group = f.get("model_weights", f)  # a whole saved model keeps them there
        for raw in group.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            names = [w.decode() if isinstance(w, bytes) else str(w) for w in
                     group[name].attrs.get("weight_names", [])]  # fmt: skip
            if names:
                short = [n.rsplit("/", 1)[-1].split(":")[0] for n in names]
                layers.append({s: np.asarray(group[name][n]) for s, n in zip(short, names)})
    return layers


@dataclass
class _Graph:
    """The nodes and initializers written so far, and the running tensor's name and size."""

    nodes: list
    initializers: list
    size: int
    count: int = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def constant(self, kind: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(kind)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attributes))
        return out


def _folded(conv: dict, bn: dict, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX kernel, bias) of a bias-free Keras convolution followed by BatchNormalization."""
    kernel = np.asarray(conv["kernel"], np.float64)
    scale = np.asarray(bn["gamma"], np.float64) / np.sqrt(
        np.asarray(bn["moving_variance"], np.float64) + BN_EPSILON
    )
    bias = np.asarray(bn["beta"], np.float64) - np.asarray(bn["moving_mean"], np.float64) * scale
    # Keras (h, w, in, out) -> ONNX (out, in, h, w); depthwise (h, w, channels, 1) -> (channels,
    # 1, h, w)
    kernel = kernel.transpose((2, 3, 0, 1) if depthwise else (3, 2, 0, 1))
    if kernel.shape[0] != scale.shape[0]:
        raise ValueError(f"a kernel of shape {conv['kernel'].shape} before {scale.shape[0]} BN")
    return kernel * scale[:, None, None, None], bias


def _pads(size: int, stride: int, same_padding: bool) -> tuple[int, int]:
    """(before, after) zero padding of a 3x3 convolution on `size` pixels: TensorFlow's "same"
    (the extra pixel after), or MobileNetV2's ZeroPadding2D(correct_pad) before a stride-2
    depthwise convolution (the extra pixel before, for odd sizes)."""
    if stride == 1:
        return 1, 1
    if same_padding:
        out = -(-size // stride)
        total = max((out - 1) * stride + 3 - size, 0)
        return total // 2, total - total // 2
    return 1 - (1 - size % 2), 1


def _conv(g: _Graph, x: str, conv: dict, bn: dict, spec: tuple[int, bool, bool]) -> str:
    """Conv (BN folded) [+ ReLU6]; spec: (stride, depthwise, relu6). 3x3 kernels are padded
    as Keras pads them (see _pads): the first convolution with "same", the depthwise ones with
    ZeroPadding2D where they have stride 2."""
    stride, depthwise, relu6 = spec
    kernel, bias = _folded(conv, bn, depthwise)
    size = kernel.shape[-1]
    attributes = {"strides": [stride, stride], "kernel_shape": [size, size]}
    if depthwise:
        attributes["group"] = kernel.shape[0]
    if size == 3:
        before, after = _pads(g.size, stride, same_padding=not depthwise)
        attributes["pads"] = [before, before, after, after]
        g.size = (g.size + before + after - 3) // stride + 1
    w, b = g.constant("kernel", kernel), g.constant("bias", bias)
    y = g.node("Conv", [x, w, b], **attributes)
    if relu6:
        low, high = g.constant("zero", np.float32(0)), g.constant("six", np.float32(6))
        y = g.node("Clip", [y, low, high])
    return y


def _block(g: _Graph, x: str, layers: list[dict], stride: int, channels: int) -> tuple[str, int]:
    """One inverted residual block from its layers' weights: (output, its channels)."""
    y = x
    if len(layers) == 6:  # expand 1x1, BN
        y = _conv(g, y, layers[0], layers[1], (1, False, True))
        layers = layers[2:]
    y = _conv(g, y, layers[0], layers[1], (stride, True, True))
    y = _conv(g, y, layers[2], layers[3], (1, False, False))
    out = int(layers[2]["kernel"].shape[-1])
    if stride == 1 and out == channels:
        y = g.node("Add", [x, y])
    return y, out


def _check_widths(weights: list[dict[str, np.ndarray]], sizes: list[int], alpha: float) -> None:
    """A ValueError unless the weights are those of MobileNetV2 at `alpha` (Keras refuses to load
    another width's file; this builder must not build one under the wrong fingerprint)."""
    widths = [int(weights[0]["kernel"].shape[-1])]
    ends = np.cumsum(sizes)[1:-1]  # each block's last layer is its projection's BatchNorm
    widths += [int(weights[end - 2]["kernel"].shape[-1]) for end in ends]
    expected = [_make_divisible(32 * alpha)]
    expected += [_make_divisible(int(f * alpha)) for f in BLOCK_FILTERS]
    if widths != expected:
        raise ValueError(f"layer widths {widths}, MobileNetV2 at alpha {alpha} has {expected}")


def build_model(weights: list[dict[str, np.ndarray]], image_size: int, alpha: float):
    """The onnx.ModelProto of MobileNetV2 at `alpha` (no top, average pooling, featx's
    preprocessing) with `weights` (read_weights), on (N, image_size, image_size, 3) float32
    pixels 0..255 in NHWC; output (N, features). A ValueError when the weights are not those of
    that architecture."""
    import onnx
    from onnx import TensorProto, helper

    # conv+BN, 17 blocks of 4 or 6 weighted layers (block 0 has no expansion), conv+BN at the end
    sizes = [2] + [4] + [6] * 16 + [2]
    if len(weights) != sum(sizes):
        raise ValueError(f"{len(weights)} layers with weights; MobileNetV2 has {sum(sizes)}")
    _check_widths(weights, sizes, alpha)
    g = _Graph([], [], image_size)
    x = g.node("Transpose", ["image"], perm=[0, 3, 1, 2])
    x = g.node("Mul", [x, g.constant("scale", np.float32(1 / 127.5))])
    x = g.node("Add", [x, g.constant("offset", np.float32(-1))])
    x = _conv(g, x, weights[0], weights[1], (2, False, True))
    channels, i = int(weights[0]["kernel"].shape[-1]), 2
    for stride, n in zip(BLOCK_STRIDES, sizes[1:-1]):
        x, channels = _block(g, x, weights[i : i + n], stride, channels)
        i += n
    x = _conv(g, x, weights[i], weights[i + 1], (1, False, True))
    x = g.node("GlobalAveragePool", [x])
    x = g.node("Flatten", [x], axis=1)
    dim = int(weights[i]["kernel"].shape[-1])
    pixels = ["N", image_size, image_size, 3]
    graph = helper.make_graph(
        g.nodes,
        "featx_backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, pixels)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dim])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="featx"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build(weights_path: str | Path, image_size: int, alpha: float, out: str | Path) -> None:
    """Write the ONNX backbone of the MobileNetV2 weights file `weights_path` (width `alpha`)
    to `out`.

    A FeatxError when `onnx` is missing; a ValueError (or KeyError, OSError) when the file is not
    a MobileNetV2 no-top weights file: the caller then converts the Keras model instead."""
    try:
        import onnx
    except ImportError as e:
        raise FeatxError(f"building the ONNX backbone needs `onnx` ({e})") from None
    model = build_model(read_weights(weights_path), image_size, alpha)
    onnx.save_model(model, str(out))
