import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from camouflage_train.data.dataset import PersonImageDataset, collate_skipping
from camouflage_train.data.sources import SyntheticSource
from camouflage_train.models.backbone import load_frozen_backbone
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.pipelines.base import CamouflageBase, build_controls, control_kwargs, stock_controlnet_pipeline
from camouflage_train.pipelines.controls import CannyEdges, SobelLines
from camouflage_train.pipelines.light import CamouflageLight, build_pipeline

STEPS = 3
CONTROLS = {
    "canny": {"model": "preset:tiny-controlnet-1", "preprocessor": CannyEdges()},
    "lines": {"model": "preset:tiny-controlnet-2", "preprocessor": SobelLines(), "scale": 0.5, "end": 0.8},
}
RECON = {"enabled": True, "model": "preset:tiny-controlnet-3", "scale": 1.0, "start": 0.0, "end": 1.0}


@pytest.fixture
def scenes(schema):
    dataset = PersonImageDataset(SyntheticSource(schema.to_config(), 2, 64, seed=4), schema, 64)
    batch = collate_skipping([dataset[0], dataset[1]])
    images = [_to_pil(x) for x in batch["pixel_values"]]
    return images, batch


def _to_pil(pixels):
    from torchvision.transforms.v2 import functional as TF

    return TF.to_pil_image((pixels + 1) / 2)


def _arrays(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _stock(backbone, controls, images, prompts):
    pipe = stock_controlnet_pipeline(backbone, [c.controlnet for c in controls])
    return pipe(
        prompt=prompts,
        negative_prompt=[""] * len(images),
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="pil",
        **control_kwargs(controls, images),
    ).images


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_base_without_guidance_is_the_stock_controlnet_pipeline(scenes, tiny_model_dir):
    images, batch = scenes
    persons = PersonBatch.from_batch(batch)
    backbone = load_frozen_backbone("preset:tiny")
    controls = build_controls(CONTROLS, "fp32", None)
    prompts = ["a photo of people", "two people"]
    stock = _stock(backbone, controls, images, prompts)
    base = CamouflageBase(backbone, controls, {"enabled": False}, guidance_scale=5.0, num_inference_steps=STEPS)
    assert np.array_equal(_arrays(base(images, persons, [7, 8], prompts)), _arrays(stock))
    # The reconstruction branch at scale 0, or outside its step range, changes nothing either.
    for anonymization in ({**RECON, "scale": 0.0}, {**RECON, "end": 0.3}):  # 0.3 < 1/3: no step in range
        off = CamouflageBase(backbone, controls, anonymization, guidance_scale=5.0, num_inference_steps=STEPS)
        assert np.array_equal(_arrays(off(images, persons, [7, 8], prompts)), _arrays(stock))


def test_anonymization_guidance_changes_output_with_one_extra_controlnet_pass(scenes, tiny_model_dir):
    images, batch = scenes
    persons, prompts = PersonBatch.from_batch(batch), ["a photo of people"] * 2
    backbone = load_frozen_backbone("preset:tiny")
    controls = build_controls(CONTROLS, "fp32", None)
    base = CamouflageBase(backbone, controls, RECON, guidance_scale=5.0, num_inference_steps=STEPS)
    unet_calls, recon_calls = _count_calls(backbone.unet), _count_calls(base.reconstruction.controlnet)
    structure_calls = [_count_calls(c.controlnet) for c in controls]
    guided = base(images, persons, [7, 8], prompts)
    assert len(unet_calls) == STEPS and len(recon_calls) == STEPS
    assert [len(c) for c in structure_calls] == [STEPS, STEPS]
    stock = _stock(backbone, controls, images, ["a photo of people"] * 2)
    assert np.abs(_arrays(guided) - _arrays(stock)).mean() > 1.0
    # Restricted to person regions, an image without persons gives the guidance nothing to act on.
    base.anonymization["person_regions"] = True
    nobody = PersonBatch(persons.boxes, persons.continuous, persons.categorical, torch.zeros_like(persons.mask))
    assert np.array_equal(_arrays(base(images, nobody, [7, 8], prompts)), _arrays(stock))
    assert not np.array_equal(_arrays(base(images, persons, [7, 8], prompts)), _arrays(stock))
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        CamouflageBase(backbone, controls, RECON, guidance_scale=1.0)


def test_base_img2img_and_seeds(scenes, tiny_model_dir):
    images, batch = scenes
    persons, prompts = PersonBatch.from_batch(batch), ["a photo of people"] * 2
    backbone = load_frozen_backbone("preset:tiny")
    controls = build_controls(CONTROLS, "fp32", None)
    base = CamouflageBase(backbone, controls, RECON, guidance_scale=5.0, num_inference_steps=4, strength=0.5)
    a, b = base(images, persons, [1, 2], prompts), base(images, persons, [1, 2], prompts)
    assert np.array_equal(_arrays(a), _arrays(b))
    assert not np.array_equal(_arrays(a)[0], _arrays(base(images[:1], persons[:1], [3], prompts[:1]))[0])


def test_light_at_adapter_scale_zero_is_the_stock_pipeline(scenes, make_cfg, tiny_model_dir):
    images, batch = scenes
    module = instantiate(make_cfg("experiment=demo_tiny").model)
    backbone = load_frozen_backbone("preset:tiny")
    persons = PersonBatch.from_batch(batch)
    prompts = list(batch["caption"])
    light = CamouflageLight(
        _backbone_of(module),
        module.encoder,
        module.adapter_config,
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        adapter_scale=0.0,
    )
    plain = build_pipeline(
        backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.unet, backbone.noise_scheduler.config
    )
    stock = plain(
        prompt=prompts,
        negative_prompt=[""] * 2,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
    ).images
    assert np.abs(_arrays(light(images, persons, [7, 8], prompts)) - _arrays(stock)).max() <= 1
    light.set_adapter_scale(1.0)
    assert np.abs(_arrays(light(images, persons, [7, 8], prompts)) - _arrays(stock)).mean() > 1.0

    controls = build_controls(CONTROLS, "fp32", None)
    light_cn = CamouflageLight(
        _backbone_of(module),
        module.encoder,
        module.adapter_config,
        controls=controls,
        guidance_scale=5.0,
        num_inference_steps=STEPS,
        adapter_scale=0.0,
    )
    stock_cn = _stock(backbone, controls, images, prompts)
    assert np.abs(_arrays(light_cn(images, persons, [7, 8], prompts)) - _arrays(stock_cn)).max() <= 1


def _backbone_of(module):
    from camouflage_train.models.backbone import FrozenBackbone

    return FrozenBackbone(
        module.vae,
        module.text_encoder,
        module.tokenizer,
        module.unet,
        module.noise_scheduler,
        module.backbone_name,
        module.backbone_source,
    )


def test_light_from_training_checkpoint(scenes, trained_checkpoint):
    images, batch = scenes
    path, module = trained_checkpoint
    loaded = CamouflageLight.from_checkpoint(str(path), guidance_scale=5.0, num_inference_steps=STEPS)
    direct = CamouflageLight(
        _backbone_of(module),
        module.encoder.eval(),
        module.adapter_config,
        guidance_scale=5.0,
        num_inference_steps=STEPS,
    )
    persons, prompts = PersonBatch.from_batch(batch), list(batch["caption"])
    a, b = _arrays(loaded(images, persons, [5, 6], prompts)), _arrays(direct(images, persons, [5, 6], prompts))
    # Bit-identical weights, built by different code (the checkpoint through diffusers' loader vs the training
    # module's own init), so not the very same computation: a last bit may round differently. At most one 8-bit
    # step (measured: 1 level in 0.004 % of the values when other tests ran first, none when run alone).
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01


def test_light_keeps_the_scene_outside_the_person_regions_with_a_few_step_solver(scenes, make_cfg, tiny_model_dir):
    """keep_background: outside the persons' (grown) extents, their whole drawn bodies, the output is the real scene;
    inside, new content drawn in its context, the body as well as the face. The DPM-Solver++ sampler is chosen by
    name."""
    from camouflage_train.models.ip_adapter import person_region_masks

    images, batch = scenes
    module = instantiate(make_cfg("experiment=demo_tiny").model)
    persons = PersonBatch.from_batch(batch)
    light = CamouflageLight(
        _backbone_of(module), module.encoder, module.adapter_config, guidance_scale=3.0, num_inference_steps=4,
        scheduler={"name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"}, keep_background=True,
    )  # fmt: skip
    assert type(light.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    out, real = _arrays(light(images, persons, [7, 8], list(batch["caption"]))), _arrays(images)
    regions = person_region_masks(
        persons.extents, persons.mask, (64, 64), module.adapter_config.region_expand, cover=True
    )
    inside = regions.amax(dim=1).numpy() > 0
    faces = person_region_masks(persons.boxes, persons.mask, (64, 64), 1.0).amax(dim=1).numpy() > 0
    body_only = inside & ~faces  # clothes and hair, outside every face box
    assert inside.any() and (~inside).any() and body_only.sum() > faces.sum()
    # Exact on any CPU: outside the regions the output's pixels are copied from the input image, not computed.
    assert np.array_equal(out[~inside], real[~inside])
    assert np.abs(out - real)[inside].mean() > 10.0  # the persons are drawn anew
    assert np.abs(out - real)[body_only].mean() > 10.0  # their bodies too, not only their faces
    plain = CamouflageLight(
        _backbone_of(module), module.encoder, module.adapter_config, guidance_scale=3.0, num_inference_steps=4,
        scheduler={"name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"},
    )  # fmt: skip
    assert not np.array_equal(_arrays(plain(images, persons, [7, 8], list(batch["caption"])))[~inside], real[~inside])


def test_a_feathered_paste_blends_only_across_the_region_border():
    """paste_outside with a feather: far outside the region the original, far inside the generated image, a blend
    of the two along the border; without one, a hard border."""
    from PIL import Image

    from camouflage_train.pipelines.regions import paste_outside

    original = Image.new("RGB", (64, 64), (0, 0, 0))
    generated = Image.new("RGB", (64, 64), (200, 200, 200))
    persons = PersonBatch(
        torch.tensor([[[0.25, 0.25, 0.75, 0.75]]]), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long),
        torch.tensor([[True]]),
    )  # fmt: skip
    hard = np.asarray(paste_outside([original], [generated], persons, 1.0)[0])[..., 0].astype(int)
    soft = np.asarray(paste_outside([original], [generated], persons, 1.0, feather=0.05)[0])[..., 0].astype(int)
    assert hard[32, 32] == 200 and hard[32, 2] == 0 and set(np.unique(hard)) == {0, 200}  # the box is [16, 48)
    assert soft[32, 32] == 200 and soft[32, 2] == 0 and soft[2, 2] == 0  # 3.2 px blur: far pixels untouched
    assert 0 < soft[32, 15] < 200 and 0 < soft[32, 16] < 200  # the border is blended on both sides
