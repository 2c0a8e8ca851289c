"""Models: paper parameter counts (Table 2), output shapes, compatibility checks, A.2 defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dst.datasets import DataInfo
from dst.models import (
    MODELS,
    IncompatibleModelError,
    ModelEntry,
    ModelOptions,
    TrainingDefaults,
    build_model,
    get_model,
)
from dst.registry import UnknownNameError

HIGGS = DataInfo("higgs", "tabular", (24,), 2)
CIFAR10 = DataInfo("cifar10", "image", (3, 32, 32), 10)
FASHION = DataInfo("fashion-mnist", "image", (1, 28, 28), 10)
IMAGENET = DataInfo("imagenet", "image", (3, 224, 224), 1000)
DIGITS = DataInfo("digits", "image", (1, 8, 8), 10)
GRAY_BINARY = DataInfo("gray-binary", "image", (1, 32, 32), 2)
TINY = DataInfo("tiny", "image", (3, 32, 32), 7)

ALL_NAMES = [
    "small-mlp",
    "large-mlp",
    "small-cnn",
    "lenet5-caffe",
    "resnet56",
    "vgg16",
    "efficientnet-b0",
    "resnet50",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_prunable_weights(model: nn.Module) -> int:
    """Conv and linear weights only: what the paper counts for ResNet-50."""
    layers = (m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    return sum(m.weight.numel() for m in layers)


def output(name: str, info: DataInfo, batch: int = 2) -> torch.Tensor:
    model = build_model(name, info).eval()
    with torch.no_grad():
        return model(torch.randn(batch, *info.input_shape))


def test_registered_names_in_order() -> None:
    assert MODELS.names() == ALL_NAMES
    assert all(get_model(n).name == n for n in ALL_NAMES)


@pytest.mark.parametrize(
    ("name", "info", "expected"),
    [
        ("small-mlp", HIGGS, 72_449),
        ("large-mlp", CIFAR10, 3_676_682),
        ("small-cnn", CIFAR10, 94_538),
        ("lenet5-caffe", FASHION, 431_080),
        ("resnet56", CIFAR10, 855_770),
        ("vgg16", DataInfo("cifar100", "image", (3, 32, 32), 100), 14_770_212),
        ("vgg16", CIFAR10, 14_724_042),
    ],
)
def test_parameter_counts_match_the_paper(name: str, info: DataInfo, expected: int) -> None:
    assert n_params(build_model(name, info)) == expected


def test_resnet50_counts_on_imagenet() -> None:
    model = build_model("resnet50", IMAGENET)
    assert n_params(model) == 25_557_032
    assert n_prunable_weights(model) == 25_502_912  # Table 2 caption


@pytest.mark.parametrize("name", ["small-mlp", "large-mlp", "small-cnn"])
def test_small_models_work_on_digits(name: str) -> None:
    assert output(name, DIGITS, batch=3).shape == (3, 10)


def test_mlp_on_tabular_binary_has_one_logit() -> None:
    assert output("small-mlp", HIGGS, batch=4).shape == (4, 1)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_outputs_num_classes_on_small_rgb(name: str) -> None:
    assert output(name, TINY).shape == (2, 7)


def first_layer_inputs(model: nn.Module) -> int:
    """in_features of the first linear layer or in_channels of the first conv."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    return first.in_features if isinstance(first, nn.Linear) else first.in_channels


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_adapts_to_gray_binary_input_and_trains(name: str) -> None:
    model = build_model(name, GRAY_BINARY).train()
    assert first_layer_inputs(model) == (32 * 32 if name.endswith("mlp") else 1)
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1)
    logits.sum().backward()


def test_lenet_sizes_its_linear_layer_from_the_input() -> None:
    model = build_model("lenet5-caffe", DataInfo("rect", "image", (3, 16, 40), 4))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 50 * 1 * 7
    assert model(torch.randn(2, 3, 16, 40)).shape == (2, 4)


def test_vgg16_works_above_32() -> None:
    assert output("vgg16", DataInfo("big", "image", (3, 48, 48), 5)).shape == (2, 5)


def test_conv_model_rejects_tabular_data() -> None:
    with pytest.raises(IncompatibleModelError) as caught:
        build_model("small-cnn", HIGGS)
    message = str(caught.value)
    assert "'small-cnn'" in message and "'higgs'" in message
    assert "image" in message and "tabular" in message and "(24,)" in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("name", "size"), [("lenet5-caffe", 16), ("vgg16", 32)])
def test_too_small_images_are_rejected(name: str, size: int) -> None:
    entry = get_model(name)
    assert entry.min_size == size
    with pytest.raises(IncompatibleModelError, match=rf"'{name}'.*'digits'.*8x8"):
        entry.check(DIGITS)
    entry.check(DataInfo("ok", "image", (1, size, size), 10))
    small = DataInfo("narrow", "image", (1, size, size - 1), 10)
    with pytest.raises(IncompatibleModelError, match="at least"):
        build_model(name, small)


@pytest.mark.parametrize("name", ["small-mlp", "large-mlp"])
def test_mlps_accept_any_input(name: str) -> None:
    entry = get_model(name)
    assert not entry.requires_image and entry.min_size == 0
    entry.check(HIGGS)
    entry.check(DIGITS)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as caught:
        get_model("nope")
    assert "nope" in str(caught.value)
    assert all(n in str(caught.value) for n in ALL_NAMES)
    with pytest.raises(UnknownNameError):
        build_model("nope", CIFAR10)


@pytest.mark.parametrize(("name", "info"), [("small-cnn", CIFAR10), ("resnet56", DIGITS)])
def test_same_seed_gives_identical_weights(name: str, info: DataInfo) -> None:
    torch.manual_seed(0)
    first = build_model(name, info).state_dict()
    torch.manual_seed(0)
    second = build_model(name, info).state_dict()
    torch.manual_seed(1)
    third = build_model(name, info).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_builds_are_fresh_models() -> None:
    entry = get_model("small-mlp")
    assert entry.build(HIGGS, ModelOptions()) is not entry.build(HIGGS, ModelOptions())


SMALL = TrainingDefaults(batch_size=128, lr=0.01, weight_decay=5e-4, epochs=100, lr_decay=0.1)


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("small-mlp", SMALL),
        ("large-mlp", SMALL),
        ("small-cnn", SMALL),
        ("lenet5-caffe", SMALL),
        ("resnet56", TrainingDefaults(128, 0.1, 1e-4, 200, 0.1)),
        ("resnet50", TrainingDefaults(256, 0.1, 1e-4, 90, 0.1)),
        ("vgg16", TrainingDefaults(128, 0.01, 1e-4, 200, 0.1)),
        ("efficientnet-b0", TrainingDefaults(128, 0.01, 1e-4, 100, 0.001)),
    ],
)
def test_training_defaults_follow_appendix_a2(name: str, defaults: TrainingDefaults) -> None:
    assert get_model(name).defaults == defaults


def test_sparse_init_is_er_for_mlps_and_erk_for_conv_models() -> None:
    inits = {n: get_model(n).default_init for n in ALL_NAMES}
    assert inits == {n: "er" if n.endswith("mlp") else "erk" for n in ALL_NAMES}


def test_entries_are_complete() -> None:
    for name in ALL_NAMES:
        entry = get_model(name)
        assert isinstance(entry, ModelEntry)
        assert entry.description
        assert entry.requires_image == (not name.endswith("mlp"))


def test_vgg16_is_the_cifar_vgg_of_the_paper_lineage() -> None:
    """Configuration D, bias-free convs + BN + ReLU, four max-pools, a 2x2 average pool and
    a single Linear(512, classes) classifier."""
    model = build_model("vgg16", CIFAR10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 10)]
    features = model.features(torch.randn(1, 3, 32, 32))  # type: ignore[operator]
    assert tuple(features.shape) == (1, 512, 2, 2)  # the average pool sees a 2x2 map


def test_resnet56_weights_are_he_normal_over_fan_in() -> None:
    """Every conv and linear weight ~ N(0, 2 / fan_in), the head included (the paper's code):
    fan-out would give the stem a std of 0.118 instead of 0.272, PyTorch's default head 0.072
    instead of 0.177."""
    torch.manual_seed(0)
    layers = [
        m
        for m in build_model("resnet56", CIFAR10).modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    assert len(layers) == 58  # 55 3x3 convs, 2 projections, the head
    pooled = []
    for layer in layers:
        fan_in = layer.weight[0].numel()
        z = layer.weight.detach().flatten() / (2.0 / fan_in) ** 0.5  # ~ N(0, 1)
        assert 0.8 < float(z.std()) < 1.2, layer
        pooled.append(z)
    assert abs(float(torch.cat(pooled).std()) - 1.0) < 0.01


@pytest.mark.parametrize("name", ["small-mlp", "large-mlp"])
def test_mlp_dropout_is_active_in_training_and_off_in_evaluation(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, CIFAR10, ModelOptions(dropout=0.5))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # fresh dropout masks each call
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = build_model(name, CIFAR10)
    plain.load_state_dict(model.state_dict())  # same parameters: dropout adds none
    assert torch.allclose(plain.eval()(x), model(x))


def test_mlp_dropout_drops_the_input_and_both_hidden_layers() -> None:
    model = build_model("small-mlp", HIGGS, ModelOptions(dropout=0.05))
    seen: list[str] = []
    for name in ("fc1", "fc2", "fc3"):
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda _m, args, n=name: seen.append(n) or None)
    dropped: list[torch.Tensor] = []
    dropout = model.get_submodule("dropout")
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.05
    dropout.register_forward_hook(lambda _m, _i, out: dropped.append(out))
    model.train()(torch.ones(8, 24))
    assert len(dropped) == 3 and seen == ["fc1", "fc2", "fc3"]
    assert dropped[0].shape == (8, 24)  # the input itself is dropped


def test_mlp_without_dropout_has_no_dropout_layer() -> None:
    model = build_model("large-mlp", CIFAR10)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_dropout_is_refused_by_models_without_it() -> None:
    with pytest.raises(ValueError, match="has no dropout; dropout is available for small-mlp"):
        build_model("resnet56", CIFAR10, ModelOptions(dropout=0.1))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        ModelOptions(dropout=1.0)


def test_every_registered_model_names_a_network_builder() -> None:
    """The registry names builders as strings (it imports no torch): each must exist."""
    from dst import networks
    from dst.models import MODELS

    for name in MODELS.names():
        assert callable(getattr(networks, MODELS.get(name).builder, None)), name
