"""Random intensity augmentations of M3 that MONAI's own do not cover.

* :class:`RandGaussianShiftIntensityd` - additive brightness drawn from N(0, sigma) per channel. MONAI's
  ``RandShiftIntensityd(channel_wise=True)`` draws uniformly from +-offsets, not from a Gaussian with
  M3's sigma 0.3.
* :class:`RandChannelGammad` - gamma drawn per channel in [0.7, 1.5], each channel keeping its mean
  and standard deviation. MONAI's ``RandAdjustContrastd(retain_stats=True)`` draws one gamma for the
  whole image and keeps the statistics of all channels together; this applies MONAI's
  ``AdjustContrast`` channel by channel.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import AdjustContrast, MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type


class RandGaussianShiftIntensityd(RandomizableTransform, MapTransform):
    """With probability ``prob``, add ``N(0, std)`` to each channel (one offset per channel) - M3's brightness.

    Args:
        keys: image keys.
        std: standard deviation of the additive offset (M3: 0.3, on z-scored intensities).
        prob: probability of applying.
        channel_wise: one offset per channel (M3) or one for the whole image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        std: float = 0.3,
        prob: float = 0.5,
        channel_wise: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.std, self.channel_wise = float(std), channel_wise
        self.offsets: np.ndarray | None = None

    def randomize(self, num_channels: int) -> None:
        """Draw whether to apply and the offsets."""
        super().randomize(None)
        self.offsets = self.R.normal(0.0, self.std, size=num_channels if self.channel_wise else 1)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Shift every key with the same offsets."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(d[first_key].shape[0])
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            shape = (-1,) + (1,) * (img.ndim - 1)
            offsets = np.broadcast_to(self.offsets, (img.shape[0],)).reshape(shape).copy()
            d[key] = img + convert_to_dst_type(offsets, img, dtype=img.dtype)[0]
        return d


class RandChannelGammad(RandomizableTransform, MapTransform):
    """With probability ``prob``, a gamma in ``gamma`` per channel, keeping each channel's mean and std (M3).

    Each channel goes through MONAI's ``AdjustContrast(gamma, retain_stats=True)``: intensities
    are mapped to [0, 1] by the channel's min/max, raised to gamma, mapped back, then shifted and
    scaled to the channel's original mean and standard deviation.

    Args:
        keys: image keys.
        gamma: range of gamma (M3: 0.7 to 1.5), drawn uniformly per channel.
        prob: probability of applying.
        retain_stats: keep each channel's mean and standard deviation.
    """

    def __init__(
        self,
        keys: KeysCollection,
        gamma: Sequence[float] = (0.7, 1.5),
        prob: float = 0.5,
        retain_stats: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {gamma}")
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.retain_stats = retain_stats
        self.gammas: np.ndarray | None = None

    def randomize(self, num_channels: int) -> None:
        """Draw whether to apply and one gamma per channel."""
        super().randomize(None)
        self.gammas = self.R.uniform(self.gamma[0], self.gamma[1], size=num_channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Apply per-channel gamma to every key (same gammas for every key)."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(d[first_key].shape[0])
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            channels = [
                AdjustContrast(float(g), retain_stats=self.retain_stats)(t[c : c + 1])
                for c, g in enumerate(self.gammas)
            ]
            d[key] = convert_to_dst_type(torch.cat(channels), img, dtype=img.dtype)[0]
        return d
