"""CLIP-T (caption vs output) and CLIP-I (original vs output) with open_clip.

torchmetrics' ``CLIPScore`` breaks with transformers 5 (torchmetrics #3407), so the scores are computed
here from an open_clip model named in config: ``100 * cosine`` averaged over images (not clamped at 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics import Metric

from camouflage_train.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "models" / "configs" / "open_clip"


class WeightsUnavailableError(UserError, OSError):
    """A metric's model weights cannot be loaded; the message names the metric and how to supply them."""


class ClipConfigError(UserError, ValueError):
    """The CLIP architecture does not match the weights it is asked to load."""


def check_activation(model_name: str, pretrained: str | None) -> None:
    """Refuse an architecture whose activation differs from the one its pretrained weights were trained with.

    OpenAI's CLIP weights need QuickGELU; open_clip 3.x builds ``ViT-L-14`` with GELU and, given ``openai`` weights,
    only warns, so every CLIP score would come from a different network. The ``-quickgelu`` model names build the
    right one.

    Args:
        model_name: the open_clip architecture (``metrics.clip.model_name``).
        pretrained: the pretrained tag (``metrics.clip.pretrained``); a file path or ``None`` is not checked.
    """
    import open_clip

    if pretrained is None or Path(str(pretrained)).is_file():
        return
    wants_quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu"))
    builds_quick_gelu = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu"))
    if wants_quick_gelu and not builds_quick_gelu:
        raise ClipConfigError(
            f"metrics.clip: the '{pretrained}' weights of {model_name} were trained with QuickGELU, but open_clip "
            f"builds '{model_name}' with GELU, which would score with a different network; set "
            f"metrics.clip.model_name={model_name}-quickgelu"
        )


class ClipScorer(nn.Module):
    """An open_clip model + its preprocessing and tokenizer; ``pretrained=None`` gives random weights.

    Args:
        model_name: the open_clip architecture; OpenAI weights need a ``-quickgelu`` name (checked).
        pretrained: a pretrained tag of that architecture, a local checkpoint file, or ``None``.
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai") -> None:
        super().__init__()
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)  # the tiny test/demo architecture
        check_activation(model_name, pretrained)  # before any download
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        except Exception as err:
            raise WeightsUnavailableError(
                f"CLIP scores: cannot load open_clip '{model_name}' weights '{pretrained}' ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Download them once with internet (they cache under "
                f"~/.cache/huggingface) or set metrics.clip.pretrained to a local checkpoint path."
            ) from err
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm CLIP image embeddings ``[N, D]``.

        Args:
            images: RGB images.
        """
        device = next(self.model.parameters()).device
        batch = torch.stack([self.preprocess(image) for image in images]).to(device)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``[N, D]``.

        Args:
            texts: the captions.
        """
        device = next(self.model.parameters()).device
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(device)).float(), dim=-1)


class ClipScores(Metric):
    """Running means of CLIP-T and CLIP-I (x100 cosine)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("clip_t", "clip_i", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, output: torch.Tensor, original: torch.Tensor, caption: torch.Tensor) -> None:
        """Normalized features ``[B, D]`` of outputs, originals and captions."""
        self.clip_t += (100 * (output * caption).sum(-1)).sum().double()
        self.clip_i += (100 * (output * original).sum(-1)).sum().double()
        self.count += output.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"clip_t": self.clip_t / count, "clip_i": self.clip_i / count, "n": self.count}
