"""The networks of the paper (Appendix A.1, Table 2): the PyTorch modules behind each
registered model of :mod:`dst.models`.

Kept apart from the registry so that naming and checking a model (the spec, the REST API, the
job driver) does not import torch; a model's builder is imported when the model is built.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from dst.datasets import DataInfo
from dst.models import ModelOptions

# --- shape helpers ----------------------------------------------------------------------------


def _flat_features(info: DataInfo) -> int:
    """Input width of an MLP: MLPs flatten any input (Table 2 uses 24 and 3*32*32)."""
    return math.prod(info.input_shape)


def _in_channels(info: DataInfo) -> int:
    """Input channels of a conv model (C of the (C, H, W) image shape)."""
    return info.input_shape[0]


# --- MLPs (Table 2) ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten, two ReLU hidden layers and a linear output (Table 2, both MLPs).

    ``dropout`` > 0 drops the input and both hidden layers' activations with that rate: the
    dense + dropout baseline of Figure 4 (the paper uses 0.05). With 0 there is no dropout.
    """

    def __init__(
        self, in_features: int, hidden: tuple[int, int], out_features: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], out_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [B, out_features]."""
        h = self.dropout(torch.flatten(x, 1))  # [B, in_features]
        h = self.dropout(torch.relu(self.fc1(h)))  # [B, hidden0]
        h = self.dropout(torch.relu(self.fc2(h)))  # [B, hidden1]
        return self.fc3(h)


def build_small_mlp(info: DataInfo, options: ModelOptions) -> nn.Module:
    """Small-MLP: hidden sizes 256, 256 (Table 2; 72,449 parameters on Higgs)."""
    return MLP(_flat_features(info), (256, 256), info.num_outputs, options.dropout)


def build_large_mlp(info: DataInfo, options: ModelOptions) -> nn.Module:
    """Large-MLP: hidden sizes 1024, 512 (Table 2; 3,676,682 parameters on CIFAR-10)."""
    return MLP(_flat_features(info), (1024, 512), info.num_outputs, options.dropout)


# --- small-CNN (Table 2) and LeNet-5-Caffe (Appendix A.1) -------------------------------------


def _conv_relu(in_channels: int, out_channels: int, kernel: int, padding: int) -> list[nn.Module]:
    """A stride-1 conv followed by ReLU (the paper uses ReLU everywhere, Appendix A.1)."""
    return [nn.Conv2d(in_channels, out_channels, kernel, 1, padding), nn.ReLU()]


def build_small_cnn(info: DataInfo, options: ModelOptions) -> nn.Module:
    """Small-CNN: three 3x3 convs (32, 64, 128), two 2x2 max-pools, global average pool
    and a linear head (Table 2; 94,538 parameters on CIFAR-10)."""
    return nn.Sequential(
        *_conv_relu(_in_channels(info), 32, 3, 1),
        nn.MaxPool2d(2),
        *_conv_relu(32, 64, 3, 1),
        nn.MaxPool2d(2),
        *_conv_relu(64, 128, 3, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, info.num_outputs),
    )


def _lenet_side(size: int) -> int:
    """Spatial size after LeNet-5-Caffe's two (5x5 valid conv, 2x2 max-pool) stages."""
    return ((size - 4) // 2 - 4) // 2


def build_lenet5_caffe(info: DataInfo, options: ModelOptions) -> nn.Module:
    """LeNet-5-Caffe (Appendix A.1, after [34]): conv 20 and conv 50 (5x5) with max-pools,
    then Linear(50*h*w, 500) and the output layer (431,080 parameters on FashionMNIST)."""
    height, width = (_lenet_side(s) for s in info.input_shape[1:3])
    return nn.Sequential(
        *_conv_relu(_in_channels(info), 20, 5, 0),
        nn.MaxPool2d(2),
        *_conv_relu(20, 50, 5, 0),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * height * width, 500),
        nn.ReLU(),
        nn.Linear(500, info.num_outputs),
    )


# --- ResNet-56 (He et al. 2016, CIFAR variant; Appendix A.1) ----------------------------------


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free 3x3 conv (followed by BatchNorm, so a bias would be redundant)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + BN projection when the shape changes (He et al. option B;
    this gives the paper's 855,770 parameters for ResNet-56, Table 2 caption)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first one may downsample or change width."""
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 6n+2 layers in three stages of 16/32/64 channels."""

    def __init__(self, in_channels: int, num_outputs: int, blocks_per_stage: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, blocks_per_stage, 1)
        self.layer2 = _stage(16, 32, blocks_per_stage, 2)
        self.layer3 = _stage(32, 64, blocks_per_stage, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_outputs)
        _kaiming_init_fan_in(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, three residual stages, global average pool, linear head."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def _kaiming_init_convs(model: nn.Module) -> None:
    """He (kaiming normal, fan-out) init for every conv, as in He et al. (2015, 2016)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _kaiming_init_fan_in(model: nn.Module) -> None:
    """He normal init, N(0, 2 / fan_in), for every conv and linear weight; biases keep
    PyTorch's default. The paper names no initialization for ResNet-56; this is its code's."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def build_resnet56(info: DataInfo, options: ModelOptions) -> nn.Module:
    """ResNet-56: 9 BasicBlocks per stage (He et al. 2016; 855,770 parameters on CIFAR-10)."""
    return CifarResNet(_in_channels(info), info.num_outputs, blocks_per_stage=9)


# --- VGG-16 with BatchNorm, for CIFAR (Appendix A.1, after [34]) ------------------------------


def _vgg16_config() -> list[int | str]:
    """VGG configuration D: conv widths, ``"M"`` for a 2x2 max-pool (Simonyan & Zisserman);
    the fifth block ends in the 2x2 average pool of :func:`build_vgg16` instead."""
    return [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _vgg_features(in_channels: int) -> nn.Sequential:
    """Bias-free conv3x3-BN-ReLU stacks and max-pools of VGG-16 (BatchNorm variant of [34])."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in _vgg16_config():
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        width = int(item)
        layers += [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
    return nn.Sequential(*layers)


def build_vgg16(info: DataInfo, options: ModelOptions) -> nn.Module:
    """VGG-16 with BatchNorm for CIFAR, as the paper uses it (Appendix A.1, after [34]).

    Configuration D with bias-free convs, max-pools after the first four blocks, an average
    pool after the fifth and one ``Linear(512, classes)`` (14,770,212 parameters on CIFAR-100).
    On 32x32 input the fifth block's map is 2x2, where the adaptive pool is exactly the 2x2
    average pool of [34]; on larger inputs it averages the whole map. Initialization as in
    that lineage: He-normal (fan-out) convs, classifier weights N(0, 0.01²) and zero bias.
    """
    classifier = nn.Linear(512, info.num_outputs)
    nn.init.normal_(classifier.weight, 0.0, 0.01)
    nn.init.zeros_(classifier.bias)
    model = nn.Sequential(
        OrderedDict(
            features=_vgg_features(_in_channels(info)),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=classifier,
        )
    )
    _kaiming_init_convs(model)
    return model


# --- torchvision models: EfficientNet-B0 and ResNet-50 (Appendix A.1) -------------------------


def _replace_stem(model: nn.Module, path: str, in_channels: int) -> None:
    """Swap the stem conv at ``path`` for a fresh one taking ``in_channels`` channels.

    The torchvision models assume RGB input; gray or multispectral datasets need a new stem.
    """
    old = model.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"expected a Conv2d stem at {path!r}, found {type(old).__name__}")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        old.stride,  # type: ignore[arg-type]
        old.padding,  # type: ignore[arg-type]
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    model.set_submodule(path, new)


def _with_channels(model: nn.Module, stem: str, in_channels: int) -> nn.Module:
    """``model`` with its stem replaced when the input is not 3-channel."""
    if in_channels != 3:
        _replace_stem(model, stem, in_channels)
    return model


def build_efficientnet_b0(info: DataInfo, options: ModelOptions) -> nn.Module:
    """EfficientNet-B0 from torchvision, untrained (Appendix A.1; 64x64 Tiny-ImageNet in A.2)."""
    from torchvision import models as tv_models

    model = tv_models.efficientnet_b0(weights=None, num_classes=info.num_outputs)
    return _with_channels(model, "features.0.0", _in_channels(info))


def build_resnet50(info: DataInfo, options: ModelOptions) -> nn.Module:
    """ResNet-50 from torchvision, untrained (He et al. 2016; 25,502,912 conv+linear weights)."""
    from torchvision import models as tv_models

    model = tv_models.resnet50(weights=None, num_classes=info.num_outputs)
    return _with_channels(model, "conv1", _in_channels(info))
