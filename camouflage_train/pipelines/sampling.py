"""The sampling defaults, in one place: both pipelines, the training sample grids and the export's model card
read them from here.

Two different guidances meet in this project; the names keep them apart:

* ``guidance_scale``: classifier-free guidance, the scale ``s`` of ``eps_neg + s * (eps_pos - eps_neg)``
  (every diffusers pipeline's argument of that name).
* ``anonymization``: Base's anonymization guidance, a reconstruction ControlNet on the negative branch only
  (``anonymization.scale`` is its strength; see :mod:`camouflage_train.pipelines.base`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSettings:
    """How an image is sampled when a config does not say.

    Args:
        num_inference_steps: denoising steps of the sampler.
        guidance_scale: the classifier-free guidance scale (1 switches the negative branch off).
        prompt: the caption when an image has none.
        negative_prompt: the caption of the negative branch.
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    prompt: str = "a photo of people"
    negative_prompt: str = ""


SAMPLING = SamplingSettings()
