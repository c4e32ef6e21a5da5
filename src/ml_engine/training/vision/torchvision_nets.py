"""torchvision's classification architectures by name, fitted to the data's channels, classes
and image size.

- classes: a fresh last ``nn.Linear`` (torchvision's own ``num_classes`` when not pretrained);
- channels ≠ 3: the first convolution is rebuilt for them (pretrained: its RGB filters summed
  into each new channel's share, so a grayscale image gets what its RGB copy would have);
- small images (either side under 64 pixels, e.g. 28×28 or 32×32): ResNets lose their
  downsampling stem (a stride-1 3×3 first convolution, no max-pool), as ResNets for CIFAR do,
  so a 32×32 image still has a 4×4 map in its last stage; other families keep their stem and
  rely on their adaptive pooling.

Pretrained weights are read from the torch hub cache only, never downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.training.registry import register_network

# below this side (pixels) a ResNet's 4× stem would leave too little of the image
SMALL_INPUT = 64


def _child_path(model: nn.Module, kind: type[nn.Module], last: bool) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, kind)]
    if not names:
        raise UserError(f"{type(model).__name__} has no {kind.__name__} to adapt")
    return names[-1] if last else names[0]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _adapt_first_conv(model: nn.Module, in_channels: int, small: bool) -> None:
    path = _child_path(model, nn.Conv2d, last=False)
    old: nn.Conv2d = model.get_submodule(path)
    is_resnet_stem = small and path == "conv1" and hasattr(model, "maxpool")
    if old.in_channels == in_channels and not is_resnet_stem:
        return
    kernel, stride, padding = old.kernel_size, old.stride, old.padding
    if is_resnet_stem:
        kernel, stride, padding = (3, 3), (1, 1), (1, 1)
        model.maxpool = nn.Identity()
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )
    if kernel == old.kernel_size:  # keep what pretrained filters know
        summed = old.weight.data.sum(dim=1, keepdim=True)
        new.weight.data.copy_(summed.expand(-1, in_channels, -1, -1) / in_channels)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data)
    _replace(model, path, new)


def _adapt_head(model: nn.Module, num_classes: int) -> None:
    path = _child_path(model, nn.Linear, last=True)
    old: nn.Linear = model.get_submodule(path)
    if old.out_features != num_classes:
        _replace(model, path, nn.Linear(old.in_features, num_classes))


def pretrained_weights(arch: str):
    """The architecture's default weights, when their file is in the torch hub cache."""
    import torch.hub
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not target.is_file():
        raise UserError(
            f"model.net.pretrained=true: no weights for {arch} at {target}; put the file "
            f"{weights.url} there (or set model.net.pretrained=false)"
        )
    return weights


@register_network("torchvision")
def torchvision_net(
    arch: str = "resnet18",
    pretrained: bool = False,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: Sequence[int] = (224, 224),
    small_input_stem: bool = True,
) -> nn.Module:
    """``torchvision.models.<arch>`` with ``num_classes`` outputs for ``in_channels`` images."""
    from torchvision.models import get_model, list_models

    classifiers = list_models(module=__import__("torchvision").models)
    if arch not in classifiers:
        raise UnknownNameError("torchvision architecture", arch, classifiers)
    if pretrained:
        model = get_model(arch, weights=pretrained_weights(arch))
    else:
        model = get_model(arch, weights=None, num_classes=num_classes)
    small = small_input_stem and min(image_size) < SMALL_INPUT
    _adapt_first_conv(model, in_channels, small)
    _adapt_head(model, num_classes)
    return model
