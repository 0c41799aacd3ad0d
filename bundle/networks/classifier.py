"""M2's tumour-presence classifier: ResNet-50 with the paper's head (method M2 in ``docs/methods.md``).

MONAI's ``resnet50`` builds the backbone (standard stem: 7 x 7 stride-2 convolution and max pooling,
as in He et al. and the ImageNet models; MONAI's default first convolution has stride 1), without
its single ``fc`` layer. The paper's head: "Average Pooling, Flatten, two Dense layers with ReLU
activation, dropout layers, and a softmax output layer": global average pooling and flattening
(the backbone's), then two dense layers, each with ReLU and dropout, then the output layer, a dense
layer whose two logits the softmax turns into P(no tumour), P(tumour) (the softmax is taken by the
loss and by the inference, on the logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import resnet50
from torch import nn

from bundle.errors import UserError

#: Feature width of ResNet-50 after global average pooling.
RESNET50_FEATURES = 2048


class SliceGateClassifier(nn.Module):
    """ResNet-50 -> global average pooling -> flatten -> (dense + ReLU + dropout) x 2 -> dense -> 2 logits.

    Args:
        spatial_dims: 2 for axial slices ``(N, C, H, W)``.
        in_channels: input channels (the four MRI modalities).
        hidden_features: width of each hidden dense layer (the paper gives none; ours 256).
        dropout: dropout probability after each (the paper gives none; ours 0.5).
        num_classes: 2 (softmax over no tumour / tumour).
        dense_layers: hidden dense layers with ReLU and dropout (the paper's 2; gates saved before the
            paper's head had 1, which their plans record, ``bundle.plan.migrate``).

    Returns logits ``(N, num_classes)``; ``softmax(logits)[:, 1]`` is the probability of tumour.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        hidden_features: int = 256,
        dropout: float = 0.5,
        num_classes: int = 2,
        dense_layers: int = 2,
    ) -> None:
        super().__init__()
        # torchvision's layout (no bias in the shortcut convolutions), so ImageNet weights load by name
        self.backbone = resnet50(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            shortcut_type="B",
            bias_downsample=False,
        )
        if dense_layers < 1:
            raise ValueError(f"SliceGateClassifier: dense_layers {dense_layers} must be at least 1")
        layers: list[nn.Module] = []
        for i in range(dense_layers):
            width = RESNET50_FEATURES if i == 0 else hidden_features
            layers += [nn.Linear(width, hidden_features), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.head = nn.Sequential(*layers, nn.Linear(hidden_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of slices."""
        return self.head(self.backbone(x))


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """ImageNet's 3-channel first convolution for ``in_channels`` inputs: the RGB mean, repeated, rescaled.

    Every new channel gets the mean of the RGB filters times ``3 / in_channels``, so a 4-channel image
    whose channels all equal one grey image gives the response the RGB filters give to it.
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *[1] * (weight.dim() - 2)) * (weight.shape[1] / in_channels)


def load_pretrained_backbone(network: SliceGateClassifier, path: str | Path | None) -> SliceGateClassifier:
    """Load ResNet-50 weights (e.g. torchvision's ImageNet ``resnet50`` state dict saved to ``path``) into the backbone.

    The classification layer (``fc.*``) is dropped and the first convolution adapted to the input
    channels (:func:`adapt_first_conv`); every other weight must match by name and shape. Nothing is
    downloaded: save the file where the weights are available, e.g.
    ``torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict(), "resnet50.pt")``.
    ``path`` None leaves the network as it is (trained from scratch).
    """
    if not path:
        return network
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pretrained_weights file does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = network.backbone.conv1.weight
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], conv1.shape[1])
    try:
        network.backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"{path}: not ResNet-50 weights in torchvision's layout ({first})") from err
    return network
