"""Built-in classification networks, sized for small images such as 28×28 digits.

``in_channels`` (and the MLP's ``image_size``) come from the datamodule through the module, like
``num_classes``; the defaults are MNIST's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ml_engine.errors import UserError
from ml_engine.training.registry import register_network


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@register_network("cnn_mnist")
class CnnMnist(nn.Module):
    """Small VGG-style conv net: two conv pairs, max-pool between stages, then ``last_convs``
    convs at the widest width, average-pooled to ``pooled_size`` × ``pooled_size`` and flattened
    into the classifier.

    The defaults here are the original net's (one last conv, global average pooling, 36k
    parameters), so that checkpoints saved before the arguments existed rebuild unchanged; the
    config (``conf/model/net/cnn_mnist.yaml``: two last convs, the whole 7 × 7 map, 103k
    parameters) keeps where on the digit each feature fired, which global pooling throws away
    (README, "Accuracy and speed"). Any input size works: the pooling is adaptive.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        dropout: float = 0.1,
        num_classes: int = 10,
        in_channels: int = 1,
        last_convs: int = 1,
        pooled_size: int = 1,
    ) -> None:
        super().__init__()
        for key, value in (("last_convs", last_convs), ("pooled_size", pooled_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.net.{key}={value!r} is not valid; expected an integer ≥ 1")
        first, second, third = widths
        last_stage = _conv_bn_relu(second, third)
        for _ in range(last_convs - 1):
            last_stage += _conv_bn_relu(third, third)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, first),
            *_conv_bn_relu(first, first),
            nn.MaxPool2d(2),
            *_conv_bn_relu(first, second),
            *_conv_bn_relu(second, second),
            nn.MaxPool2d(2),
            *last_stage,
            nn.AdaptiveAvgPool2d(pooled_size),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(third * pooled_size**2, num_classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@register_network("mlp_mnist")
class MlpMnist(nn.Module):
    """Fully connected baseline: flatten → hidden layers with ReLU and dropout → logits."""

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256, 128),
        dropout: float = 0.2,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: Sequence[int] = (28, 28),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = in_channels * image_size[0] * image_size[1]
        for size in hidden_sizes:
            layers += [nn.Linear(in_features, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = size
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)
