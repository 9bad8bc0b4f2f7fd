import numpy as np
import pytest
import torch

from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.pipelines.light import build_pipeline, generate_light
from tests.test_module import _batch


def _generate(module, batch, seed, guidance=3.0):
    pipe = build_pipeline(module.vae, module.text_encoder, module.tokenizer, module.unet, module.noise_scheduler.config)
    persons = PersonBatch.from_batch(batch)
    return generate_light(
        pipe,
        module.encoder,
        module.adapter_config,
        persons,
        list(batch["caption"]),
        64,
        64,
        num_inference_steps=3,
        guidance_scale=guidance,
        seed=seed,
    )


def test_generation_is_seeded_and_uses_persons(tiny_module):
    batch = _batch(tiny_module, size=2)
    a = _generate(tiny_module, batch, seed=1)
    b = _generate(tiny_module, batch, seed=1)
    c = _generate(tiny_module, batch, seed=2)
    assert len(a) == 2 and a[0].size == (64, 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    moved = dict(batch)
    moved["continuous"] = torch.rand_like(batch["continuous"])
    d = _generate(tiny_module, moved, seed=1)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(d[0])), "person attributes must change the image"
    single = _generate(
        tiny_module, {k: v[:1] for k, v in batch.items() if k not in ("skipped", "skipped_items", "size")}, seed=1
    )
    # Image i depends on seed + i, not on the batch (up to float reordering in batched kernels).
    batch_gap = _mean_abs(single[0], a[0])
    seed_gap = _mean_abs(c[0], a[0])
    assert batch_gap < 0.5 and seed_gap > 10 * batch_gap, (batch_gap, seed_gap)


def _mean_abs(x, y):
    return float(np.abs(np.asarray(x).astype(float) - np.asarray(y).astype(float)).mean())


def test_each_image_gets_its_own_persons_in_a_batch(tiny_module):
    """diffusers' pipelines repeat ``ip_adapter_image_embeds`` for every prompt; generate_light must still give
    image i the persons of row i only: the batched image equals the one made alone (same seed) up to float
    reordering, far below what another image's persons change."""
    batch = _batch(tiny_module, size=2)
    persons, prompts = PersonBatch.from_batch(batch), list(batch["caption"])
    pipe = build_pipeline(
        tiny_module.vae, tiny_module.text_encoder, tiny_module.tokenizer, tiny_module.unet,
        tiny_module.noise_scheduler.config,
    )  # fmt: skip

    def make(rows, seeds):
        return generate_light(
            pipe, tiny_module.encoder, tiny_module.adapter_config, persons[rows], prompts[rows], 64, 64,
            num_inference_steps=3, guidance_scale=3.0, seeds=seeds, output_type="np",
        )  # fmt: skip

    together = make(slice(0, 2), [5, 6])
    alone = np.concatenate([make(slice(0, 1), [5]), make(slice(1, 2), [6])])
    other = _batch(tiny_module, size=2, seed=7)
    swapped = generate_light(
        pipe, tiny_module.encoder, tiny_module.adapter_config, PersonBatch.from_batch(other)[0:1], prompts[0:1],
        64, 64, num_inference_steps=3, guidance_scale=3.0, seeds=[5], output_type="np",
    )  # fmt: skip
    batch_gap = float(np.abs(together - alone).max())
    persons_gap = float(np.abs(together[0] - swapped[0]).max())
    assert batch_gap < 1e-4 and persons_gap > 100 * batch_gap, (batch_gap, persons_gap)


def test_generate_light_refuses_a_stock_pipeline_and_converts_it_without_copies(tiny_module):
    """A stock pipeline would repeat the persons' rows for every prompt: generate_light names the conversion, which
    keeps the very same modules."""
    from diffusers import StableDiffusionPipeline

    from camouflage_train.pipelines.light import LightStableDiffusionPipeline, as_light_pipeline

    stock = StableDiffusionPipeline(
        vae=tiny_module.vae, text_encoder=tiny_module.text_encoder, tokenizer=tiny_module.tokenizer,
        unet=tiny_module.unet, scheduler=tiny_module.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    batch = _batch(tiny_module, size=2)
    persons, prompts = PersonBatch.from_batch(batch), list(batch["caption"])
    args = (tiny_module.encoder, tiny_module.adapter_config, persons, prompts, 64, 64)
    with pytest.raises(TypeError, match="as_light_pipeline"):
        generate_light(stock, *args, num_inference_steps=1)
    light = as_light_pipeline(stock)
    assert isinstance(light, LightStableDiffusionPipeline) and as_light_pipeline(light) is light
    assert light.unet is stock.unet and light.vae is stock.vae and light.scheduler is stock.scheduler
    assert len(generate_light(light, *args, num_inference_steps=1)) == 2
