"""All persons' region-masked IP-Adapter attention in one batched computation.

With ``ip_adapter_masks``, diffusers' ``IPAdapterAttnProcessor2_0`` loops over the persons of an image: per
person and per cross-attention layer it runs one SDPA call over that person's few tokens, resamples that person's
mask and repeats it to the full ``[batch, queries, channels]`` size. Training a scene adapter with up to
``max_persons`` persons pays that loop in every layer, forward and backward (the GPU profile of the training
step: small kernels and glue, not FLOPs).

:class:`BatchedPersonsAttnProcessor` computes the same sum in one pass: every person's keys and values at once, a
softmax over each person's own tokens (``[..., persons, tokens]``), the masks resampled once per layer for all
persons (diffusers' own ``IPAdapterMaskProcessor.downsample``, one channel per person), and the persons' outputs
weighted by their masks and summed. It subclasses the stock processor, so parameter names, state dicts, the
exported file and ``adapter_modules`` do not change; without masks it is the stock processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch import nn


class BatchedPersonsAttnProcessor(IPAdapterAttnProcessor2_0):
    """``IPAdapterAttnProcessor2_0`` for one IP-Adapter whose images are persons with region masks, batched."""

    @classmethod
    def from_stock(cls, stock: IPAdapterAttnProcessor2_0) -> BatchedPersonsAttnProcessor:
        """The same weights (the very modules, not copies) and settings under the batched computation.

        Args:
            stock: diffusers' processor of one layer.
        """
        if len(stock.to_k_ip) != 1:
            raise ValueError(f"batched person attention supports one IP-Adapter, this layer has {len(stock.to_k_ip)}")
        processor = cls(stock.hidden_size, stock.cross_attention_dim, stock.num_tokens, stock.scale)
        processor.to_k_ip, processor.to_v_ip = stock.to_k_ip, stock.to_v_ip
        return processor

    # Copied from diffusers.models.attention_processor.IPAdapterAttnProcessor2_0.__call__
    # (diffusers 0.42.1, source sha256 3626f6de5fcd6280): the text attention and the output projection as there;
    # the per-person loop replaced by one batched computation over all persons (`_persons_attention`).
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if ip_adapter_masks is None or not isinstance(encoder_hidden_states, tuple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale)
        text, (persons,) = encoder_hidden_states
        (masks,) = ip_adapter_masks if isinstance(ip_adapter_masks, list) else [ip_adapter_masks]
        if persons.ndim != 4 or masks.ndim != 4 or masks.shape[1] != persons.shape[1]:
            raise ValueError(
                f"expected person tokens [batch, persons, tokens, dim] and masks [batch, persons, height, width], "
                f"got {tuple(persons.shape)} and {tuple(masks.shape)}"
            )
        if not persons.shape[0] == masks.shape[0] == text.shape[0]:
            raise ValueError(
                f"person tokens, masks and text have batch sizes {persons.shape[0]}, {masks.shape[0]} and "
                f"{text.shape[0]}: one row of persons per image is needed (diffusers' pipelines repeat "
                "ip_adapter_image_embeds for every prompt; see camouflage_train.pipelines.light)"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, length = text.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        def heads(x: torch.Tensor) -> torch.Tensor:  # [..., length, heads * dim] -> [..., heads, length, dim]
            return x.unflatten(-1, (attn.heads, -1)).transpose(-2, -3)

        query = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(
            query, heads(attn.to_k(text)), heads(attn.to_v(text)), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).flatten(2).to(query.dtype)

        person_scale = self.scale[0]
        if not isinstance(person_scale, (int, float)):
            raise ValueError(f"batched person attention takes one adapter scale for all persons, got {person_scale!r}")
        if person_scale != 0:
            out = out + person_scale * self._active_persons_attention(query, persons, masks)

        out = attn.to_out[1](attn.to_out[0](out))
        if spatial is not None:
            out = out.transpose(1, 2).reshape(spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _active_persons_attention(
        self, query: torch.Tensor, persons: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_persons_attention` computed only for the images with a person region, zeros for the others.

        Under classifier-free guidance the negative half of every batch has no persons (all-zero masks), so at
        inference half of this layer's person attention is skipped. Only without gradients and outside
        ``torch.compile`` (the choice depends on the data; training keeps one static graph).
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._persons_attention(query, persons, masks)
        active = masks.flatten(1).any(dim=1)
        if bool(active.all()):
            return self._persons_attention(query, persons, masks)
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1] * query.shape[3])
        if bool(active.any()):
            out[active] = self._persons_attention(query[active], persons[active], masks[active])
        return out

    def _persons_attention(self, query: torch.Tensor, persons: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``sum_p mask_p * softmax(q k_p^T / sqrt(d)) v_p`` for ``query [B, H, N, d]``: ``[B, N, H * d]``.

        Two matmuls over all ``persons x tokens`` keys; the softmax runs over each person's own tokens (fp32), and
        the mask weights go onto the probabilities, so nothing of size ``[B, H, N, persons, d]`` is made.
        """
        batch, num_heads, queries, head_dim = query.shape
        num_persons, num_tokens = persons.shape[1:3]

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, P, T, H*d] -> [B, H, P*T, d]
            return x.unflatten(-1, (num_heads, head_dim)).permute(0, 3, 1, 2, 4).flatten(2, 3)

        keys, values = heads(self.to_k_ip[0](persons)), heads(self.to_v_ip[0](persons))
        scores = (query @ keys.transpose(-1, -2)).unflatten(-1, (num_persons, num_tokens)) * head_dim**-0.5
        weights = IPAdapterMaskProcessor.downsample(masks.flatten(0, 1), batch * num_persons, queries, 1)
        weights = weights.view(batch, num_persons, queries).transpose(1, 2)[:, None, :, :, None]  # [B, 1, N, P, 1]
        probs = scores.float().softmax(dim=-1) * weights.float()
        out = probs.flatten(-2).to(values.dtype) @ values  # [B, H, N, d]
        return out.transpose(1, 2).flatten(2).to(query.dtype)


def batch_person_attention(unet: nn.Module) -> int:
    """Swap every stock IP-Adapter processor of ``unet`` for :class:`BatchedPersonsAttnProcessor`, in place;
    returns how many were swapped. Weights and parameter names stay; only the computation changes.

    Args:
        unet: a UNet with the adapter installed.
    """
    processors, swapped = {}, 0
    for name, processor in unet.attn_processors.items():
        if type(processor) is IPAdapterAttnProcessor2_0:
            processor, swapped = BatchedPersonsAttnProcessor.from_stock(processor), swapped + 1
        processors[name] = processor
    unet.set_attn_processor(processors)
    return swapped
