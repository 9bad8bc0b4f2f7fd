"""The training objective against its specification: independent random decisions, Min-SNR as the paper
defines it, fp32 noise arithmetic under a low-precision backbone, validation's plain objective, the adapter
scale through an export, exact originals. Each test checks a property of the reference, not the code's formula."""

import warnings

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from camouflage_train.data.dataset import PersonImageDataset
from camouflage_train.data.sampling import sample_seed
from camouflage_train.data.sources import RawSample
from tests.conftest import cpu_trainer

# Chi-square with one degree of freedom at p = 0.001: a fixed seed range makes the test deterministic; this bound
# only says how far from independence a fair sample may look.
CHI2_1DF_P001 = 10.83


def _chi_square(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's chi-square of the 2x2 table of two boolean arrays (independence has expectation 1)."""
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


class _OneImage:
    """A source of one left-right asymmetric image with one person (so a flip is visible in the pixels)."""

    def __init__(self) -> None:
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:, :4] = 255
        person = {"box": [0.1, 0.1, 0.5, 0.6], "age": 30.0, "gender": "female", "yaw": 10.0, "pitch": 0.0, "roll": 0.0}
        self.sample = RawSample(image=Image.fromarray(pixels), persons=[person], caption="c", key="k", name="k.png")

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> RawSample:
        return self.sample


def test_every_random_decision_of_a_sample_reads_its_own_stream(tiny_module, schema):
    """Over many training sample seeds, the dataset's flip, the caption drop and the person drop are independent
    (chi-square of each pair's 2x2 table), and the caption drop happens at its rate on flipped and unflipped
    images alike. Sharing one stream made every dropped caption a flipped image."""
    dataset = PersonImageDataset(_OneImage(), schema, 16, flip_prob=0.5)
    seeds = [sample_seed(0, 0, i) for i in range(3000)]
    flipped = np.array([bool(dataset[(0, s)]["pixel_values"][0, 0, -1] > 0) for s in seeds])
    tiny_module.hparams.text_dropout = tiny_module.hparams.attribute_dropout = 0.3
    batch = {"person_mask": torch.zeros(len(seeds), 4, dtype=torch.bool), "sample_seed": seeds}
    draw = tiny_module._draw(batch, latent_shape=(4, 2, 2), generator=None, timesteps=(0, 1000))
    text, persons = draw.drop_text.numpy(), draw.drop_persons.numpy()
    for a, b, pair in (
        (flipped, text, "flip/caption"),
        (flipped, persons, "flip/persons"),
        (text, persons, "caption/persons"),
    ):
        assert _chi_square(a, b) < CHI2_1DF_P001, pair
    for rate, expected, n in (
        (flipped.mean(), 0.5, len(seeds)),
        (text[flipped].mean(), 0.3, flipped.sum()),
        (text[~flipped].mean(), 0.3, (~flipped).sum()),
    ):
        assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (rate, expected, n)
    # The normal draws of a sample are not one another either (distinct streams give uncorrelated numbers).
    first = torch.stack([draw.latent[:, 0, 0, 0], draw.noise[:, 0, 0, 0], draw.offset[:, 0, 0, 0]]).numpy()
    correlations = np.corrcoef(first)[np.triu_indices(3, 1)]
    assert np.abs(correlations).max() < 4 / np.sqrt(len(seeds)), correlations


@pytest.mark.parametrize(
    "prediction_type, weight",
    [
        ("epsilon", lambda snr, gamma: min(snr, gamma) / snr),
        ("v_prediction", lambda snr, gamma: min(snr, gamma) / (snr + 1)),
    ],
)
def test_min_snr_weights_each_sample_by_the_papers_formula_at_any_batch_size(tiny_module, prediction_type, weight):
    """Min-SNR-gamma (Hang et al. 2023, diffusers' examples): the loss is the mean over samples of
    w(t) * that sample's MSE, w = min(SNR, gamma) / SNR for epsilon (/(SNR + 1) for v), SNR(t) = alpha_bar /
    (1 - alpha_bar). A batch of one is weighted too (a nearly clean timestep far below 1), and a sample's weight
    does not depend on its batch."""
    gamma = 5.0
    tiny_module.noise_scheduler.register_to_config(prediction_type=prediction_type)
    alpha_bar = tiny_module.noise_scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn((3, 4, 8, 8), generator=generator), torch.randn((3, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 50, 500])
    singles = []
    for i, t in enumerate(timesteps.tolist()):
        snr = float(alpha_bar[t] / (1 - alpha_bar[t]))
        mse = float((prediction[i] - target[i]).double().pow(2).mean())
        one = slice(i, i + 1)
        single = float(tiny_module.regression_loss(prediction[one], target[one], timesteps[one], gamma))
        assert single == pytest.approx(weight(snr, gamma) * mse, rel=1e-5), t
        singles.append(single)
    assert singles[0] < 0.01 * float((prediction[0] - target[0]).pow(2).mean())  # t = 0: SNR ~ 1000
    together = float(tiny_module.regression_loss(prediction, target, timesteps, gamma))
    assert together == pytest.approx(np.mean(singles), rel=1e-5)
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        tiny_module.regression_loss(prediction, target, timesteps, 0.0)
    tiny_module.noise_scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="supports epsilon and v_prediction"):
        tiny_module.regression_loss(prediction, target, timesteps, gamma)


def test_a_min_snr_gamma_that_cannot_act_over_the_timestep_range_is_named_at_start(demo_cfg, tiny_model_dir):
    """With SD's schedule SNR < 5 from t ~ 150 on, so over [400, 1000) every Min-SNR-5 weight is 1: the module
    warns at start, naming both settings; over every timestep it does not."""
    demo_cfg.model.snr_gamma = 5.0
    demo_cfg.model.timestep_range = [400, 1000]
    with pytest.warns(
        UserWarning, match=r"model\.snr_gamma=5\.0 has no effect with model\.timestep_range=\[400, 1000\]"
    ):
        instantiate(demo_cfg.model)
    demo_cfg.model.timestep_range = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        instantiate(demo_cfg.model)
    assert not [w for w in seen if "snr_gamma" in str(w.message)], [str(w.message) for w in seen]


def _cached_batch(module, size=4, side=16, seed=0):
    """A cached-style batch: known clean latents (zero posterior spread), random text, one person each."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(size, module.schema.max_persons, 4)
    boxes[:, 0] = torch.tensor([0.2, 0.2, 0.6, 0.7])
    mask = torch.zeros(size, module.schema.max_persons, dtype=torch.bool)
    mask[:, 0] = True
    return {
        "latent_mean": torch.randn((size, 4, side, side), generator=generator),
        "latent_std": torch.zeros(size, 4, side, side),
        "text_embeds": torch.randn((size, 77, module.text_encoder.config.hidden_size), generator=generator),
        "boxes": boxes,
        "extents": boxes.clone(),
        "continuous": torch.zeros(size, module.schema.max_persons, len(module.schema.continuous)),
        "categorical": torch.zeros(size, module.schema.max_persons, len(module.schema.categorical), dtype=torch.long),
        "person_mask": mask,
        "sample_seed": [sample_seed(1, 0, i) for i in range(size)],
    }


def test_a_bf16_backbone_gets_the_schedules_noise_level_at_the_nearly_clean_timesteps(make_cfg, tiny_model_dir):
    """The noisy latent the bf16 UNet receives at t = 0, 1, 2 is sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise
    with the schedule's noise level within 1 % (regression on the noise). In bf16 arithmetic 1 - alpha_bar
    rounds: no noise at all at t = 0 and 1."""
    module = instantiate(make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=bf16").model)
    module.train_timesteps = (0, 3)
    batch = _cached_batch(module, size=6)
    draws, inputs = [], []
    draw = module._draw
    module._draw = lambda *a, **k: draws.append(draw(*a, **k)) or draws[-1]
    module.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    module.diffusion_loss(batch, training=True)
    drawn, noisy = draws[0], inputs[0].double()
    assert inputs[0].dtype == torch.bfloat16  # the UNet's own dtype at its input
    alpha_bar = module.noise_scheduler.alphas_cumprod.double()
    clean = batch["latent_mean"].double() * module.vae.config.scaling_factor
    assert set(drawn.timesteps.tolist()) <= {0, 1, 2} and len(set(drawn.timesteps.tolist())) >= 2
    for i, t in enumerate(drawn.timesteps.tolist()):
        noise = drawn.noise[i].double()
        residual = noisy[i] - alpha_bar[t].sqrt() * clean[i]
        level = float((residual * noise).sum() / (noise * noise).sum())
        assert level == pytest.approx(float((1 - alpha_bar[t]).sqrt()), rel=0.01), (t, level)


def test_validation_losses_do_not_depend_on_noise_offset(tiny_module):
    """Validation keeps the plain objective: the same batch and seed give the same loss whatever
    ``noise_offset`` training uses."""
    from tests.test_module import _batch

    batch = _batch(tiny_module, size=2)
    tiny_module.eval()
    tiny_module.hparams.noise_offset = 0.0
    plain = tiny_module.validation_losses(batch, 0)["loss"]
    tiny_module.hparams.noise_offset = 0.5
    with_offset = tiny_module.validation_losses(batch, 0)["loss"]
    # The very same computation twice (the offset is not applied): bit-identical on any CPU.
    assert torch.equal(plain, with_offset)
    tiny_module.train()
    seeded = {**batch, "sample_seed": [1, 2]}
    offset = tiny_module.diffusion_loss(seeded, training=True)
    tiny_module.hparams.noise_offset = 0.0
    # Training does use it: an offset of 0.5 moves the loss far beyond any rounding difference.
    assert not torch.equal(offset, tiny_module.diffusion_loss(seeded, training=True))


def test_an_export_at_adapter_scale_half_gives_the_projects_images_in_stock_diffusers(
    make_cfg, tmp_path, tiny_model_dir
):
    """An adapter trained at ``adapter.scale=0.5``: the export's model card code, run as written with stock
    diffusers, gives the image of the project's Light pipeline; at the stock default scale (1.0) it would not."""
    from camouflage_train.export import export_adapter
    from camouflage_train.models.conditioning import PersonBatch
    from camouflage_train.pipelines.light import CamouflageLight, generate_light

    cfg = make_cfg("experiment=demo_tiny", "data.batch_size=2", "model.adapter.scale=0.5")
    module = instantiate(cfg.model)
    trainer = cpu_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    checkpoint = tmp_path / "light.ckpt"
    trainer.save_checkpoint(checkpoint)
    folder = export_adapter(checkpoint, tmp_path / "export")
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)  # as written, nothing substituted
    snippet = np.asarray(namespace["image"]).astype(int)

    light = CamouflageLight.from_checkpoint(str(checkpoint))
    arrays = [module.schema.to_arrays(persons, "card") for persons in namespace["records"]]
    persons = PersonBatch(
        *(
            torch.from_numpy(np.stack([getattr(a, f) for a in arrays]))
            for f in ("boxes", "continuous", "categorical", "mask", "extents")
        )
    )

    def ours() -> np.ndarray:
        image = generate_light(
            light.pipe, light.encoder, light.adapter_config, persons, ["a photo of people"], 64, 64, seeds=[0]
        )[0]
        return np.asarray(image).astype(int)

    gap = np.abs(snippet - ours())
    assert gap.max() <= 1 and gap.mean() < 0.01, (gap.max(), gap.mean())  # one 8-bit rounding step at most
    light.set_adapter_scale(1.0)
    assert np.abs(snippet - ours()).max() > 8  # the scale is visible: a card that dropped it would fail above


def test_originals_come_back_to_8_bits_exactly():
    """Every 8-bit level goes through the datasets' [-1, 1] conversion and back unchanged (the evaluation's
    originals and anonymization's inputs are these images)."""
    from camouflage_train.data.images import pixels_to_image

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    pixels = TF.to_dtype(levels, torch.float32, scale=True) * 2.0 - 1.0  # PersonImageDataset's conversion
    back = np.asarray(pixels_to_image(pixels))
    # Exact on any CPU: elementwise IEEE arithmetic (no reduction, no BLAS), each value within 1e-4 of its level.
    assert np.array_equal(back, levels.permute(1, 2, 0).numpy())
