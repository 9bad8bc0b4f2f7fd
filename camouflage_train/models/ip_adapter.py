"""Decoupled cross-attention on a frozen UNet, built with diffusers' own IP-Adapter machinery.

The adapter is installed by diffusers' own UNet-level loader (what a pipeline's public ``load_ip_adapter`` calls
after reading the file; :func:`~camouflage_train.compat.diffusers_internals.load_ip_adapter_weights`) from an
IP-Adapter state dict in the original ``{"image_proj", "ip_adapter"}`` layout, so the modules it creates are
exactly those a stock pipeline creates from an exported file:

* ``unet.encoder_hid_proj``: a FaceID-style projection (``proj.0``/``proj.2``/``norm`` keys), the one
  diffusers layout whose token count is free: ``tokens_per_person`` tokens per person embedding;
* one ``IPAdapterAttnProcessor2_0`` per cross-attention layer, whose ``to_k_ip``/``to_v_ip`` start as
  copies of the layer's own ``to_k``/``to_v`` (keys numbered 1, 3, 5, ... over all processors).

Persons are passed as the "images" of one IP-Adapter, each with its own region mask through
``cross_attention_kwargs={"ip_adapter_masks": [masks]}``. Padded persons get an all-zero mask, so they
contribute exactly nothing; without region masks a real person's mask is the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterFaceIDImageProjection
from torch import nn

from camouflage_train.compat.diffusers_internals import load_ip_adapter_weights
from camouflage_train.models.person_attention import batch_person_attention

# diffusers' FaceID projection names -> the original IP-Adapter file names it converts from.
_PROJ_TO_ORIGINAL = (("ff.net.0.proj.", "proj.0."), ("ff.net.2.", "proj.2."))
# Where the projection sits in a training checkpoint's state dict.
_PROJ_PREFIX = "unet.encoder_hid_proj.image_projection_layers.0."


# A person acts inside its box grown this much around its centre (the adapter's regions, Base's guidance regions).
DEFAULT_REGION_EXPAND = 1.5
REGION_OVERLAPS = ("sum", "nearest")


@dataclass(frozen=True)
class AdapterConfig:
    """The "adapter size" (what sweeps vary) and how persons act on the image.

    Args:
        embed_dim: the person embedding's width.
        tokens_per_person: tokens each person adds to the cross-attention.
        proj_mult: hidden width of the projection, in multiples of ``embed_dim``.
        encoder_width: the attribute encoder's hidden width.
        encoder_depth: its layers.
        fourier_freqs: Fourier frequencies of the box and continuous inputs.
        category_dim: the embedding width of each categorical attribute.
        region_masks: each person acts only inside its region (else on the whole image).
        region_expand: the region: the person's extent (its body under a schema with ``body``, else its face box)
            grown this much around its centre.
        face_expand: under a schema with ``body``, each person has a second slot, its face, acting inside its face
            box grown this much (the first acts in its extent): the face is placed where its box says.
        region_overlap: where regions overlap, ``sum`` adds the persons' attention outputs; ``nearest`` gives each
            position to the person whose box centre is nearest (:func:`split_overlapping_regions`); with two slots
            per person, extents and faces are split apart, so a position may hold one person's extent and another's
            face.
        scale: the adapter attention's weight.
    """

    embed_dim: int = 512
    tokens_per_person: int = 4
    proj_mult: int = 1
    encoder_width: int = 256
    encoder_depth: int = 2
    fourier_freqs: int = 8
    category_dim: int = 32
    region_masks: bool = True
    region_expand: float = DEFAULT_REGION_EXPAND
    face_expand: float = 1.25
    region_overlap: str = "sum"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.tokens_per_person < 1 or self.proj_mult < 1:
            raise ValueError(f"tokens_per_person and proj_mult must be >= 1, got {self}")
        if self.region_expand < 1.0 or self.face_expand < 1.0:
            raise ValueError(
                f"region_expand and face_expand must be >= 1 (1 = the box itself), got {self.region_expand}, "
                f"{self.face_expand}"
            )
        if self.region_overlap not in REGION_OVERLAPS:
            raise ValueError(f"region_overlap must be one of {REGION_OVERLAPS}, got {self.region_overlap!r}")


def cross_attention_keys(unet: nn.Module) -> list[tuple[str, int]]:
    """``(processor name, IP-Adapter key id)`` for every cross-attention layer, in diffusers' numbering.

    Args:
        unet: the UNet.
    """
    keys, key_id = [], 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            keys.append((name, key_id))
            key_id += 2
    return keys


def _attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def image_proj_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``IPAdapterFaceIDImageProjection`` state dict to the original file layout.

    Args:
        state_dict: the projection's diffusers state dict.
    """
    out = {}
    for key, value in state_dict.items():
        for new, old in _PROJ_TO_ORIGINAL:
            key = key.replace(new, old)
        out[key] = value
    return out


def checkpoint_state_dict(checkpoint: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """A training checkpoint's adapter in the original ``{"image_proj", "ip_adapter"}`` layout (fp32): what
    export writes and what :func:`install_ip_adapter` (and so a stock pipeline) loads.

    Args:
        checkpoint: a loaded Light training checkpoint.
    """
    state, keys = checkpoint["state_dict"], checkpoint["camouflage"]["ip_adapter_keys"]  # see adapter_checkpoint
    image_proj = {k.removeprefix(_PROJ_PREFIX): v for k, v in state.items() if k.startswith(_PROJ_PREFIX)}
    ip_adapter = {}
    for name, key_id in keys.items():
        for kind in ("to_k_ip", "to_v_ip"):
            weight = state.get(f"unet.{name}.{kind}.0.weight")
            if weight is not None:
                ip_adapter[f"{key_id}.{kind}.weight"] = weight
    if not image_proj or len(ip_adapter) != 2 * len(keys):
        raise ValueError("checkpoint holds no complete IP-Adapter (projection or to_k_ip/to_v_ip missing)")
    as_float = lambda d: {k: v.detach().float().contiguous() for k, v in d.items()}  # noqa: E731
    return {"image_proj": as_float(image_proj_to_original(image_proj)), "ip_adapter": as_float(ip_adapter)}


def initial_state_dict(unet: nn.Module, config: AdapterConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh IP-Adapter state dict: random projection, ``to_k_ip``/``to_v_ip`` copied from ``to_k``/``to_v``.

    Args:
        unet: the UNet it is for.
        config: the adapter's size.
    """
    projection = IPAdapterFaceIDImageProjection(
        image_embed_dim=config.embed_dim,
        cross_attention_dim=unet.config.cross_attention_dim,
        mult=config.proj_mult,
        num_tokens=config.tokens_per_person,
    )
    ip_adapter = {}
    for name, key_id in cross_attention_keys(unet):
        attn = _attention_module(unet, name)
        ip_adapter[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().float().clone()
        ip_adapter[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().float().clone()
    return {"image_proj": image_proj_to_original(projection.state_dict()), "ip_adapter": ip_adapter}


def adapter_modules(unet: nn.Module) -> list[nn.Module]:
    """The trainable parts inside the UNet: the projection and every IP-Adapter processor.

    Args:
        unet: a UNet with the adapter installed.
    """
    if unet.encoder_hid_proj is None:
        raise RuntimeError("no IP-Adapter is installed on this UNet")
    processors = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    return [unet.encoder_hid_proj, *processors]


class ComputeDtypeLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose fp32 (master) weight is applied in the frozen attention's dtype.

    The frozen UNet can then run natively in bf16/fp16 with autocast off (no fp32 group norms, no cast of
    every activation), while the trainable ``to_k_ip``/``to_v_ip`` keep fp32 weights and get fp32
    gradients through the cast. The dtype follows the frozen ``to_k`` weight of the same layer, so
    ``unet.to(dtype)`` keeps both in step. Parameter names are those of ``nn.Linear``.

    Args:
        linear: the layer whose (fp32) weight this one takes over.
        frozen: the frozen layer whose dtype it computes in.
    """

    def __init__(self, linear: nn.Linear, frozen: nn.Linear) -> None:
        if linear.bias is not None:
            raise ValueError("IP-Adapter projections have no bias")
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self._frozen_weight = (frozen.weight,)  # a tuple: not registered, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._frozen_weight[0].dtype
        return F.linear(x.to(dtype), self.weight.to(dtype))


def install_ip_adapter(
    unet: nn.Module,
    state_dict: dict[str, dict[str, torch.Tensor]],
    scale: float = 1.0,
    batched_persons: bool = True,
) -> list[nn.Module]:
    """Install the adapter through diffusers' loader, keep it fp32 and trainable; return its modules.

    ``to_k_ip``/``to_v_ip`` compute in the UNet's dtype (:class:`ComputeDtypeLinear`), so a bf16 UNet
    needs no autocast; the projection ``encoder_hid_proj`` computes in fp32 (a few tokens per person).
    ``batched_persons`` computes all persons' masked attention at once
    (:class:`~camouflage_train.models.person_attention.BatchedPersonsAttnProcessor`, same weights and result);
    ``False`` keeps diffusers' per-person loop.

    Args:
        unet: the frozen UNet (changed in place).
        state_dict: the adapter in the original IP-Adapter layout.
        scale: the adapter attention's weight.
        batched_persons: compute all persons' masked attention at once.
    """
    load_ip_adapter_weights(unet, state_dict)
    modules = adapter_modules(unet)
    for module in modules:
        module.to(torch.float32)
        module.requires_grad_(True)
    for name, _ in cross_attention_keys(unet):
        attn = _attention_module(unet, name)
        attn.processor.scale = [scale]
        for layers, frozen in ((attn.processor.to_k_ip, attn.to_k), (attn.processor.to_v_ip, attn.to_v)):
            for index, layer in enumerate(layers):
                layers[index] = ComputeDtypeLinear(layer, frozen)
    if batched_persons:
        batch_person_attention(unet)
        modules = adapter_modules(unet)
    return modules


def person_region_masks(
    boxes: torch.Tensor,
    person_mask: torch.Tensor,
    size: tuple[int, int],
    expand: float | None,
    cover: bool = False,
) -> torch.Tensor:
    """``[B, P, H, W]`` float masks: each person's box grown ``expand`` times around its centre (``None``: the
    whole image), times ``person_mask`` so padded persons are all zero. A cell is inside when its centre is
    (``cover``: when any part of it is, so every cell the box touches is covered, however small the box).

    Args:
        boxes: ``[B, P, 4]`` normalised boxes.
        person_mask: ``[B, P]`` bool, true for real persons.
        size: ``(H, W)`` of the masks.
        expand: the growth of each box (``None``: whole-image masks).
        cover: count the cells the box only partly covers too.
    """
    height, width = size
    batch, persons = person_mask.shape
    mask = person_mask.to(torch.float32)[..., None, None]
    if expand is None:
        return mask.expand(batch, persons, height, width).contiguous()
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) * (expand / 2)
    lo, hi = (centre - half).clamp(0, 1), (centre + half).clamp(0, 1)
    if cover:  # the cell [i, i + 1) / n meets [lo, hi]
        rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
        cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
        inside_y = ((rows + 1) / height > lo[..., 1, None]) & (rows / height < hi[..., 1, None])
        inside_x = ((cols + 1) / width > lo[..., 0, None]) & (cols / width < hi[..., 0, None])
    else:
        ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) / width
        inside_y = (ys >= lo[..., 1, None]) & (ys <= hi[..., 1, None])
        inside_x = (xs >= lo[..., 0, None]) & (xs <= hi[..., 0, None])
    return (inside_y[..., :, None] & inside_x[..., None, :]).to(torch.float32) * mask


def split_overlapping_regions(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``masks`` with every position that several persons' regions cover given to one of them: the person whose
    box centre is nearest in units of that box's size (the largest of the horizontal and vertical distances, each
    divided by the box's width or height). The union of the regions is unchanged; they no longer overlap.

    Args:
        masks: ``[B, P, H, W]`` region masks (:func:`person_region_masks`).
        boxes: ``[B, P, 4]`` the persons' normalised boxes.
    """
    height, width = masks.shape[-2:]
    ys = (torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5) / width
    boxes = boxes.float()
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    size = (boxes[..., 2:] - boxes[..., :2]).clamp_min(1e-6)
    across = (xs - centre[..., 0, None]).abs() / size[..., 0, None]  # [B, P, W]
    down = (ys - centre[..., 1, None]).abs() / size[..., 1, None]  # [B, P, H]
    distance = torch.maximum(down[..., :, None], across[..., None, :]).masked_fill(masks <= 0, float("inf"))
    nearest = distance.argmin(dim=1)  # [B, H, W]; outside every region it picks a zero mask
    owner = torch.nn.functional.one_hot(nearest, masks.shape[1]).permute(0, 3, 1, 2).to(masks.dtype)
    return masks * owner
