"""The notebook's deliberately deep ConvNet, with and without batch norm.

For depth d = 1..19: a 3x3 conv with 4*d channels, stride 2 when d % 3 == 0, TensorFlow 'same'
padding, then ReLU. Then flatten, dense 100 + ReLU, dense 10 (logits). Spatial size on MNIST:
28 -> 14 (d=3) -> 7 (d=6) -> 4 (d=9) -> 2 (d=12) -> 1 (d=15) -> 1 (d=18); 76 features reach the dense.

With batch norm every conv and the hidden dense lose their bias (BN's beta replaces it) and become
conv -> BN -> ReLU. The logits get no BN.

``bn`` picks the normalization:
    "none"   no batch norm (the notebook's first network);
    "torch"  ``nn.BatchNorm1d/2d`` with TensorFlow's semantics: momentum 0.01 (= decay 0.99), eps 1e-3
             (the notebook's ``tf.layers.batch_normalization`` network);
    "manual" bnlab's own ``BatchNorm1d/2d`` with the notebook's conventions (as ``tf_style``): momentum 0.01
             (decay 0.99), eps 1e-3, biased population variance
             (the notebook's ``tf.nn.moments`` + ``tf.nn.batch_normalization`` network);
    "renorm", "ghost", "group"  the small-batch family (``make_norm``; docs/family.md) in the same places,
             with the same conventions: bnlab's ``BatchRenorm*`` and ``GhostBatchNorm*``, ``nn.GroupNorm``.

Initialisation follows the notebook. ``tf.layers`` uses Glorot-uniform kernels and zero biases (BN:
gamma 1, beta 0). The low-level network draws conv kernels from a normal with std 0.05 truncated at
two std, and its dense layers still come from ``tf.layers`` (Glorot uniform). ``init="auto"`` picks
the notebook's choice for the mode. Kernels are drawn from ``generator`` in layer order, so two
models built with the same seed share every kernel whatever their normalization.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab import nn as bnn
from bnlab.config import CONV_INITS, FC_INITS, MAX_PARAMETERS, NORMS, TrainConfig, check_choice
from bnlab.errors import UsageError
from bnlab.nn.convert import FUSES_RELU, group_count

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {  # by the names TrainConfig accepts
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

TF_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
TF_EPS = 1e-3


def make_norm(
    bn: str,
    num_features: int,
    dims: int,
    momentum: float = TF_MOMENTUM,
    fused_relu: bool = False,
    *,
    virtual_batch: int | None = None,
    renorm_warmup: int | None = None,
    group_channels: int = 4,
) -> nn.Module:
    """The normalization layer ``bn`` names (``config.NORMS``, not "none") for ``dims``-D input ((N, C) is 2), with
    TensorFlow's eps. bnlab's layers (manual, renorm, ghost) can fuse a ReLU and keep the biased running variance,
    as the notebook's ``tf.nn.moments``.

    renorm: ``BatchRenorm*`` with the paper's bounds (rmax 3, dmax 5), opened in a straight line over
    ``renorm_warmup`` steps (None: the layer's default). ghost: ``GhostBatchNorm*`` with ``virtual_batch`` samples
    per virtual batch. group: ``nn.GroupNorm`` with ``group_channels`` channels per group (``group_count`` of at
    most channels // group_channels groups) on a convolution's output: these networks have 4-24 channels a
    conv layer, where Wu & He's 32 groups (set for ResNets' 64-2048) would leave one channel per group, which
    is instance norm. On a dense layer's (N, C) output one group, layer norm: groups of a few values would
    normalize away most of what each holds (``convert`` refuses them for that reason), and Wu & He put
    GroupNorm on convolutions only.
    """
    check_choice("bn", bn, NORMS[1:])
    if bn == "torch":
        layer = nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d
        return layer(num_features, eps=TF_EPS, momentum=momentum)
    if bn == "group":
        groups = 1 if dims == 2 else group_count(num_features, max(1, num_features // group_channels))
        return nn.GroupNorm(groups, num_features, TF_EPS)
    options: dict[str, Any] = {"eps": TF_EPS, "momentum": momentum, "unbiased_running_var": False}
    options["fused_relu"] = fused_relu
    if bn == "renorm":
        layer = bnn.BatchRenorm1d if dims == 2 else bnn.BatchRenorm2d
        warmup = {} if renorm_warmup is None else {"warmup_steps": renorm_warmup}
        return layer(num_features, warmup="linear", **warmup, **options)
    if bn == "ghost":
        if virtual_batch is None:
            raise UsageError("ghost batch norm needs virtual_batch, the samples per virtual batch")
        layer = bnn.GhostBatchNorm1d if dims == 2 else bnn.GhostBatchNorm2d
        return layer(num_features, virtual_batch_size=virtual_batch, **options)
    layer = bnn.BatchNorm1d if dims == 2 else bnn.BatchNorm2d
    return layer(num_features, **options)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same': output = ceil(size / stride); an odd total puts the extra pad after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's 'same' padding, which can be asymmetric (bottom/right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top == bottom and left == right:  # let the conv pad: no extra copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left))
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride)


class SeedConvNet(nn.Module):
    """The notebook's network; ``depth`` and ``activation`` are configurable for the benefits lab."""

    def __init__(
        self,
        bn: str = "none",
        *,
        depth: int = 19,
        width: int = 4,
        hidden: int = 100,
        num_classes: int = 10,
        activation: str = "relu",
        init: str = "auto",
        image_size: int = 28,
        in_channels: int = 1,
        bn_momentum: float = TF_MOMENTUM,
        norm_options: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_choice("bn", bn, NORMS)
        check_choice("activation", activation, list(ACTIVATIONS))
        check_choice("init", init, CONV_INITS)
        if depth < 1 or width < 1 or hidden < 1:
            raise UsageError(f"depth, width and hidden must be positive; got {depth}, {width}, {hidden}")
        self.hparams: dict[str, Any] = dict(
            bn=bn,
            depth=depth,
            width=width,
            hidden=hidden,
            num_classes=num_classes,
            activation=activation,
            init=init,
            image_size=image_size,
            in_channels=in_channels,
            bn_momentum=bn_momentum,
            norm_options=dict(norm_options or {}),
        )
        use_bn = bn != "none"
        fuse = bn in FUSES_RELU and activation == "relu"  # bnlab's layers apply it in their own pass

        def norm_act(block: nn.Sequential, features: int, dims: int) -> None:
            if use_bn:
                norm = make_norm(bn, features, dims, momentum=bn_momentum, fused_relu=fuse, **(norm_options or {}))
                block.add_module("norm", norm)
            if not fuse:
                block.add_module("act", ACTIVATIONS[activation]())

        blocks, channels, size = [], in_channels, image_size
        for d in range(1, depth + 1):
            stride = 2 if d % 3 == 0 else 1
            block = nn.Sequential()
            block.add_module("conv", SameConv2d(channels, width * d, 3, stride, bias=not use_bn))
            norm_act(block, width * d, dims=4)
            blocks.append(block)
            channels, size = width * d, math.ceil(size / stride)
        self.blocks = nn.Sequential(*blocks)
        self.hidden = nn.Sequential()
        self.hidden.add_module("linear", nn.Linear(channels * size * size, hidden, bias=not use_bn))
        norm_act(self.hidden, hidden, dims=2)
        self.logits = nn.Linear(hidden, num_classes)
        self.reset_parameters(generator)

    @property
    def conv_init(self) -> str:
        init = self.hparams["init"]
        if init == "auto":
            return "truncated_normal" if self.hparams["bn"] == "manual" else "glorot_uniform"
        return init

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise as the notebook does, drawing kernels from ``generator`` in layer order."""
        for block in self.blocks:
            if self.conv_init == "truncated_normal":
                nn.init.trunc_normal_(block.conv.weight, std=0.05, a=-0.1, b=0.1, generator=generator)
            else:
                nn.init.xavier_uniform_(block.conv.weight, generator=generator)
        for linear in (self.hidden.linear, self.logits):
            nn.init.xavier_uniform_(linear.weight, generator=generator)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif bnn.is_batch_norm(module):
                module.reset_parameters()

    def hidden_blocks(self) -> list[nn.Module]:
        """The modules whose outputs are the hidden activations."""
        return [*self.blocks, self.hidden]

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 1, 28, 28) -> (N, 76, 1, 1) -> (N, 76) -> (N, 100) -> (N, 10) logits
        return self.logits(self.hidden(self.blocks(x).flatten(1)))


def build_model(bn: str = "none", *, seed: int = 0, **hparams: Any) -> SeedConvNet:
    """The seed network, initialised from its own generator seeded with ``seed``."""
    return SeedConvNet(bn, generator=torch.Generator().manual_seed(seed), **hparams)


def layer_rows(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> list[dict[str, Any]]:
    """The model's leaf layers in call order: name, type, output shape (N = batch), parameters."""
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # containers: their leaves are listed

        def record(mod: nn.Module, _inputs: Any, output: Tensor, name: str = name) -> None:
            shape = "(N, " + ", ".join(str(s) for s in output.shape[1:]) + ")"
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            kind = type(mod).__name__ + ("+ReLU" if getattr(mod, "fused_relu", False) else "")
            rows.append({"layer": name, "type": kind, "output": shape, "params": params})

        hooks.append(module.register_forward_hook(record))
    param = next(model.parameters(), None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows


def summary(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> str:
    """A table of the model's layers (``layer_rows``), then its parameter and buffer counts."""
    headers = ("layer", "type", "output", "params")
    rows = [tuple(str(r[h]) for h in headers) for r in layer_rows(model, input_shape)]
    widths = [max(len(r[i]) for r in [*rows, headers]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + f"  {{:>{widths[3]}}}"
    out = [line.format(*headers), "-" * (sum(widths) + 6)]
    out += [line.format(*r) for r in rows]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    out.append("-" * (sum(widths) + 6))
    out.append(f"trainable parameters: {trainable:,}   buffer values: {buffers:,}")
    return "\n".join(out)


def init_linear(weight: Tensor, init: str | float, generator: torch.Generator | None = None) -> None:
    """Fill a (out, in) weight by a named scheme, or from normal(0, init) when ``init`` is a number."""
    if not isinstance(init, str):
        nn.init.normal_(weight, std=float(init), generator=generator)
    elif init == "glorot_uniform":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif init == "glorot_normal":
        nn.init.xavier_normal_(weight, generator=generator)
    elif init == "he_uniform":
        nn.init.kaiming_uniform_(weight, nonlinearity="relu", generator=generator)
    elif init == "he_normal":
        nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
    else:  # lecun_normal: variance 1 / fan_in
        nn.init.normal_(weight, std=1.0 / math.sqrt(weight.shape[1]), generator=generator)


class FCNet(nn.Module):
    """A fully connected network: flatten, then for each hidden size Linear -> [BN] -> activation ->
    [dropout], then a Linear to the logits (never normalized).

    With batch norm the hidden Linears lose their bias (BN's beta replaces it), as in ``SeedConvNet``,
    and ``bn`` takes the same modes. ``init`` names a scheme from ``FC_INITS`` (every Linear, the logits
    included) or gives the standard deviation of a normal; biases start at zero. Weights are drawn
    from ``generator`` in layer order, so nets built with the same seed share every weight whatever
    their normalization and dropout.
    """

    def __init__(
        self,
        bn: str = "none",
        *,
        hidden: tuple[int, ...] | list[int] = (100, 100, 100),
        activation: str = "relu",
        init: str | float = "glorot_uniform",
        dropout: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
        bn_momentum: float = TF_MOMENTUM,
        norm_options: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_choice("bn", bn, NORMS)
        check_choice("activation", activation, list(ACTIVATIONS))
        if isinstance(init, str):
            check_choice("init", init, FC_INITS)
        elif not (math.isfinite(init) and init > 0):
            raise UsageError(f"an init standard deviation must be a positive number; got {init}")
        if not hidden or min(hidden) < 1:
            raise UsageError(f"hidden must list one or more positive layer sizes; got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1); got {dropout}")
        self.hparams: dict[str, Any] = dict(
            bn=bn,
            hidden=list(hidden),
            activation=activation,
            init=init,
            dropout=dropout,
            in_features=in_features,
            num_classes=num_classes,
            bn_momentum=bn_momentum,
            norm_options=dict(norm_options or {}),
        )
        use_bn = bn != "none"
        fuse = bn in FUSES_RELU and activation == "relu"  # bnlab's layers apply it in their own pass
        blocks, features = [], in_features
        for size in hidden:
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(features, size, bias=not use_bn))
            if use_bn:
                norm = make_norm(bn, size, dims=2, momentum=bn_momentum, fused_relu=fuse, **(norm_options or {}))
                block.add_module("norm", norm)
            if not fuse:
                block.add_module("act", ACTIVATIONS[activation]())
            if dropout:
                block.add_module("dropout", nn.Dropout(dropout))
            blocks.append(block)
            features = size
        self.blocks = nn.Sequential(*blocks)
        self.logits = nn.Linear(features, num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for block in self.blocks:
            init_linear(block.linear.weight, self.hparams["init"], generator)
        init_linear(self.logits.weight, self.hparams["init"], generator)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif bnn.is_batch_norm(module):
                module.reset_parameters()

    def hidden_blocks(self) -> list[nn.Module]:
        """The modules whose outputs are the hidden activations (in eval mode dropout passes them through)."""
        return list(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.blocks(x.flatten(1)))


def parameter_count(config: TrainConfig) -> int:
    """The network's number of weights, computed from the config without building it."""
    c = config
    if c.model == "convnet":
        total, channels, size = 0, 1, 28
        for d in range(1, c.depth + 1):
            total += 9 * channels * c.width * d + 3 * c.width * d  # kernel, then bias or BN (weight, bias, mean, var)
            channels, size = c.width * d, math.ceil(size / (2 if d % 3 == 0 else 1))
        return total + (channels * size * size + 4) * c.hidden[0] + (c.hidden[0] + 1) * 10
    if c.model == "mlp":
        sizes = [784, *c.hidden, 10]
        return sum((a + 4) * b for a, b in itertools.pairwise(sizes))
    from bnlab.lstm import parameter_count as lstm_parameters

    return lstm_parameters(c)


def norm_settings(config: TrainConfig) -> dict[str, Any]:
    """``make_norm``'s options for ``config``'s norm: only those it takes."""
    if config.bn == "ghost":
        return {"virtual_batch": config.virtual_batch}
    if config.bn == "renorm" and config.renorm_warmup is not None:
        return {"renorm_warmup": config.renorm_warmup}
    if config.bn == "group":
        return {"group_channels": config.group_channels}
    return {}


def build_network(config: TrainConfig) -> nn.Module:
    """The network ``config`` describes, initialised from its own generator seeded with ``config.seed``.

    Networks built from configs that differ only in ``bn`` share every weight they have in common
    (weights are drawn in layer order and BN draws none). Refuses, before allocating anything, a
    network of more than ``MAX_PARAMETERS`` weights (a hostile or mistaken config).
    """
    count = parameter_count(config)
    if count > MAX_PARAMETERS:
        raise UsageError(
            f"a {config.model} of depth {config.depth} and hidden {list(config.hidden)} would have about "
            f"{count:,} weights, more than bnlab builds ({MAX_PARAMETERS:,}); use a smaller network"
        )
    generator = torch.Generator().manual_seed(config.seed)
    momentum = TF_MOMENTUM if config.bn_momentum is None else config.bn_momentum
    options = norm_settings(config)
    if config.model == "convnet":
        return SeedConvNet(
            config.bn, depth=config.depth, width=config.width, hidden=config.hidden[0], activation=config.activation,
            init=config.init, bn_momentum=momentum, norm_options=options, generator=generator,
        )  # fmt: skip
    if config.model == "mlp":
        return FCNet(
            config.bn, hidden=config.hidden, activation=config.activation, init=config.init,
            dropout=config.dropout, bn_momentum=momentum, norm_options=options, generator=generator,
        )  # fmt: skip
    from bnlab.lstm import SequenceClassifier

    return SequenceClassifier(config, generator=generator)  # its own default momentum (bnlab.lstm.BN_MOMENTUM)
