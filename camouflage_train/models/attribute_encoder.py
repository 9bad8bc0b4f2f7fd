"""Person records -> one embedding per person.

The embedding plays the role an image/face embedding plays in IP-Adapter: it is what a stock diffusers
pipeline receives as ``ip_adapter_image_embeds`` (shape ``[batch, persons, embed_dim]``). The
projection to cross-attention tokens lives in the UNet (diffusers' FaceID projection layout), so this
encoder is the only piece a downstream user needs beside stock diffusers.

Continuous values and box coordinates (the face box, and the person's extent under a schema with ``body``) go
through fixed Fourier features (so small differences in
age, pose or position stay distinguishable); categories get learned embeddings; an MLP mixes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from camouflage_train.data.schema import AttributeSchema
from camouflage_train.models.ip_adapter import AdapterConfig


class FourierFeatures(nn.Module):
    """``x -> [x, sin(2^k pi x), cos(2^k pi x)]`` per scalar, for inputs normalized to [0, 1].

    Args:
        num_freqs: frequencies ``2^0 .. 2^(num_freqs-1)``.
    """

    def __init__(self, num_freqs: int) -> None:
        super().__init__()
        self.num_freqs = num_freqs  # no buffer: nothing to save, nothing for lazy (meta-device) loading to lose

    @property
    def multiplier(self) -> int:
        """Output values per input scalar."""
        return 1 + 2 * self.num_freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = (2.0 ** torch.arange(self.num_freqs, device=x.device, dtype=x.dtype)) * math.pi
        angles = x.unsqueeze(-1) * freqs
        features = torch.cat([x.unsqueeze(-1), angles.sin(), angles.cos()], dim=-1)
        return features.flatten(-2)


class AttributeEncoder(ModelMixin, ConfigMixin):
    """Encode padded person arrays ``[B, P, ...]`` into ``[B, P, embed_dim]``.

    Args:
        schema: the attribute schema as a config mapping (see ``AttributeSchema.from_config``).
        embed_dim: width of the per-person embedding (the IP-Adapter "image embed" width).
        width: hidden width of the MLP.
        depth: number of hidden layers of the MLP (>= 1).
        fourier_freqs: frequencies per scalar for box coordinates and continuous attributes.
        category_dim: width of each categorical attribute's learned embedding.
    """

    @register_to_config
    def __init__(
        self,
        schema: dict[str, Any],
        embed_dim: int = 512,
        width: int = 256,
        depth: int = 2,
        fourier_freqs: int = 8,
        category_dim: int = 32,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or embed_dim < 1:
            raise ValueError(f"encoder depth, width and embed_dim must be >= 1, got {depth}, {width}, {embed_dim}")
        parsed = AttributeSchema.from_config(schema)
        self.num_continuous, self.num_categorical = parsed.num_continuous, parsed.num_categorical
        self.uses_extents = parsed.body is not None  # the extent is an input only where the schema has bodies
        self.slots_per_person = 2 if self.uses_extents else 1  # [extent, face] under a schema with bodies
        self.fourier = FourierFeatures(fourier_freqs)
        self.categories = nn.ModuleList(nn.Embedding(len(c.classes), category_dim) for c in parsed.categorical)
        boxes = 8 if self.uses_extents else 4
        in_dim = (boxes + parsed.num_continuous) * self.fourier.multiplier + parsed.num_categorical * category_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, embed_dim * self.slots_per_person))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def from_adapter_config(cls, schema: dict[str, Any], config: AdapterConfig) -> AttributeEncoder:
        """The encoder of an adapter of size ``config`` (training, the Light pipeline and export build it so).

        Args:
            schema: the attribute schema's config.
            config: the adapter's size.
        """
        return cls(
            schema=schema,
            embed_dim=config.embed_dim,
            width=config.encoder_width,
            depth=config.encoder_depth,
            fourier_freqs=config.fourier_freqs,
            category_dim=config.category_dim,
        )

    def forward(
        self,
        boxes: torch.Tensor,
        continuous: torch.Tensor,
        categorical: torch.Tensor,
        extents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, P * slots_per_person, embed_dim]`` from the face boxes, attributes and (under a schema with
        ``body``) extents. Under a schema with ``body`` each person has two slots, in the order ``[extent, face]``
        (person ``i``'s are ``2i`` and ``2i + 1``): the embedding that acts in its whole extent and the one that
        acts at its face (:func:`~camouflage_train.models.conditioning.conditioning_inputs`).

        Args:
            boxes: ``[B, P, 4]`` normalised face boxes.
            continuous: ``[B, P, C]`` attributes in ``[0, 1]``.
            categorical: ``[B, P, K]`` class indices.
            extents: ``[B, P, 4]`` the persons' extents; needed (and only read) under a schema with ``body``.
        """
        if continuous.shape[-1] != self.num_continuous or categorical.shape[-1] != self.num_categorical:
            raise ValueError(
                f"expected {self.num_continuous} continuous and {self.num_categorical} categorical attributes, "
                f"got {continuous.shape[-1]} and {categorical.shape[-1]}"
            )
        dtype = self.mlp[0].weight.dtype
        places = [boxes]
        if self.uses_extents:
            if extents is None:
                raise ValueError("this encoder's schema has bodies: pass the persons' extents (PersonBatch.extents)")
            places.append(extents)
        scalars = torch.cat([*places, continuous], dim=-1).to(dtype)
        parts = [self.fourier(scalars)] + [emb(categorical[..., i]) for i, emb in enumerate(self.categories)]
        embeds = self.mlp(torch.cat(parts, dim=-1))  # [B, P, slots * E]
        return embeds.unflatten(-1, (self.slots_per_person, -1)).flatten(-3, -2)


def encoder_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The attribute encoder's weights in a training checkpoint (keys ``encoder.*``).

    Args:
        checkpoint: a loaded Light training checkpoint.
    """
    return {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items() if k.startswith("encoder.")}
