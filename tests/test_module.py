import copy
import itertools

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.sources import SyntheticSource
from tests.conftest import cpu_trainer

FROZEN_PREFIXES = ("vae.", "text_encoder.")


def _batch(module, size=2, seed=0):
    source = SyntheticSource(module.schema.to_config(), size, 64, seed=seed)
    dm = PersonDataModule(source, module.schema.to_config(), 64, val_source=source, batch_size=size, flip_prob=0.0)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def _trainer(tmp_path, **kwargs):
    return cpu_trainer(tmp_path, **{"enable_checkpointing": True, **kwargs})


def _datamodule(cfg):
    dm = instantiate(cfg.data)
    dm.batch_size = 2
    return dm


def test_gradients_reach_only_the_adapter(tiny_module):
    tiny_module.hparams.text_dropout = tiny_module.hparams.attribute_dropout = 0.0
    tiny_module.train()
    loss = tiny_module.diffusion_loss(_batch(tiny_module), training=True)
    loss.backward()
    trainable = dict(tiny_module.named_parameters())
    with_grad = {n for n, p in trainable.items() if p.grad is not None}
    expected = set(tiny_module.trainable_parameter_names())
    assert with_grad == expected
    assert all(n.startswith("encoder.") or "_ip." in n or "encoder_hid_proj" in n for n in expected)
    assert any(n.startswith("encoder.categories") for n in expected)
    assert all(trainable[n].grad.abs().sum() > 0 for n in expected if "bias" not in n)
    assert all(p.dtype == torch.float32 for n, p in trainable.items() if n in expected)


def test_frozen_parts_stay_in_eval_mode(tiny_module):
    tiny_module.train()
    assert tiny_module.training and tiny_module.encoder.training
    assert not tiny_module.unet.training and not tiny_module.vae.training and not tiny_module.text_encoder.training


def test_fixed_batch_loss_falls(tiny_module):
    """The adapter can fit: same batch, noise and timesteps every step -> the loss must go down."""
    batch = _batch(tiny_module, size=4)
    optimizer = torch.optim.AdamW([p for p in tiny_module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = tiny_module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 20, losses


def test_prediction_type_targets(tiny_module):
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(tiny_module.prediction_target(latents, noise, t), noise)
    tiny_module.noise_scheduler.register_to_config(prediction_type="v_prediction")
    velocity = tiny_module.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.equal(tiny_module.prediction_target(latents, noise, t), velocity)
    tiny_module.noise_scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type"):
        tiny_module.prediction_target(latents, noise, t)


def test_fused_adamw_option_trains_like_the_default(make_cfg, tiny_model_dir):
    """``model.optimizer.fused=true`` (a speed option of bench/train_step.py) builds torch's fused AdamW through the
    config and moves the adapter as the default (foreach) AdamW does, up to float reordering."""
    cfg = make_cfg("experiment=demo_tiny")
    modules = [instantiate(cfg.model), instantiate(cfg.model, optimizer={"fused": True})]
    modules[1].load_state_dict(modules[0].state_dict())  # the same initial adapter
    initial = {n: p.detach().clone() for n, p in modules[0].named_parameters() if p.requires_grad}
    batch = _batch(modules[0], size=2)
    optimizers = [m.optimizer_factory([p for p in m.parameters() if p.requires_grad]) for m in modules]
    assert optimizers[0].defaults["fused"] is None and optimizers[1].defaults["fused"] is True
    for module, optimizer in zip(modules, optimizers, strict=True):
        for _ in range(3):
            optimizer.zero_grad()
            module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0)).backward()
            optimizer.step()
    default, fused = (dict(m.named_parameters()) for m in modules)
    assert all(not torch.equal(default[n], v) for n, v in initial.items())  # every adapter weight moved
    for name in modules[0].trainable_parameter_names():
        torch.testing.assert_close(fused[name], default[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("which", [True, "high_res"])
def test_checkpointing_gives_the_same_loss_and_gradients(make_cfg, tiny_model_dir, which):
    """Activation checkpointing only recomputes: the loss and every adapter gradient equal those without it (the
    recomputed forward is the same computation). ``high_res`` checkpoints only the full-resolution blocks."""
    cfg = make_cfg("experiment=demo_tiny")
    plain, checkpointed = instantiate(cfg.model), instantiate(cfg.model, gradient_checkpointing=which)
    checkpointed.load_state_dict(plain.state_dict())
    flagged = {n for n, m in checkpointed.unet.named_modules() if getattr(m, "gradient_checkpointing", False)}
    blocks = {n for n in flagged if n.count(".") == 1}  # down_blocks.i / up_blocks.i / mid_block.*
    if which == "high_res":
        last_up = f"up_blocks.{len(checkpointed.unet.up_blocks) - 1}"
        assert blocks == {"down_blocks.0", last_up}
        assert all(n.startswith(("down_blocks.0.", f"{last_up}.")) for n in flagged - blocks - {""}), flagged
    else:
        assert {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"} <= blocks
    batch = _batch(plain, size=2)
    grads = []
    for module in (plain, checkpointed):
        module.train()
        loss = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(InstantiationException, match="gradient_checkpointing must be one of"):
        instantiate(cfg.model, gradient_checkpointing="mid")


def test_timestep_range_bounds_the_training_draws_only(demo_cfg, tiny_model_dir, monkeypatch):
    """Training steps (per-sample seeds or the global RNG) draw timesteps in ``[low, high)``; validation losses keep
    every timestep; a range outside the scheduler's is refused naming the field."""
    demo_cfg.model.timestep_range = [600, 1000]
    module = instantiate(demo_cfg.model)
    seen, loss = [], module.regression_loss
    monkeypatch.setattr(
        module, "regression_loss", lambda p, y, t, *rest, **kw: seen.append(t) or loss(p, y, t, *rest, **kw)
    )
    batch = _batch(module, size=8)
    module.diffusion_loss(batch, training=True)
    module.diffusion_loss({**batch, "sample_seed": list(range(8))}, training=True)
    module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    assert all(int(t.min()) >= 600 and int(t.max()) < 1000 for t in seen[:2]), seen
    assert int(seen[2].min()) < 600, seen  # 8 uniform draws over [0, 1000): all >= 600 has chance 0.4**8
    for bad in ([0, 2000], [500, 500], [100]):
        demo_cfg.model.timestep_range = bad
        with pytest.raises(InstantiationException, match="timestep_range must be"):
            instantiate(demo_cfg.model)


def test_checkpoint_holds_only_trainable_weights_and_resumes(make_cfg, tmp_path, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny")
    module = instantiate(cfg.model)
    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
    unet_frozen = {n: p.detach().clone() for n, p in module.unet.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_datamodule(cfg))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)

    # Frozen weights are bit-identical after training.
    for k, v in module.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k
    for n, p in module.unet.named_parameters():
        if n in unet_frozen:
            assert torch.equal(p, unet_frozen[n]), n

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == set(module.trainable_parameter_names())
    assert not any(k.startswith(FROZEN_PREFIXES) for k in keys)
    assert checkpoint["global_step"] == 3 and checkpoint["optimizer_states"]
    assert checkpoint["camouflage"]["backbone"] == "preset:tiny"
    frozen_bytes = sum(v.numel() * v.element_size() for v in frozen_before.values())
    ckpt_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert ckpt_bytes < frozen_bytes / 10

    # A fresh backbone + the checkpoint restores weights, step and optimizer state; training continues.
    fresh = instantiate(cfg.model)
    resumed = _trainer(tmp_path, max_steps=3)
    resumed.fit(fresh, datamodule=_datamodule(cfg), ckpt_path=path)
    assert resumed.global_step == 3
    for name in module.trainable_parameter_names():
        assert torch.equal(dict(fresh.named_parameters())[name], dict(module.named_parameters())[name]), name
    saved_state = checkpoint["optimizer_states"][0]["state"]
    restored = resumed.optimizers[0].state_dict()["state"]
    assert all(torch.equal(saved_state[i]["exp_avg"], restored[i]["exp_avg"]) for i in saved_state)
    more = _trainer(tmp_path, max_steps=5)
    more.fit(instantiate(cfg.model), datamodule=_datamodule(cfg), ckpt_path=path)
    assert more.global_step == 5


def test_checkpoint_from_another_adapter_size_is_refused(make_cfg, tmp_path, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny")
    module = instantiate(cfg.model)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=_datamodule(cfg))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = instantiate(make_cfg("experiment=demo_tiny", "model.adapter.encoder_depth=3").model)
    with pytest.raises(ValueError, match="checkpoint does not match this adapter"):
        _trainer(tmp_path, max_steps=2).fit(other, datamodule=_datamodule(cfg), ckpt_path=tmp_path / "a.ckpt")


def test_precision_guards(make_cfg, tmp_path, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=bf16")
    module = instantiate(cfg.model)
    autocast = instantiate(
        make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=bf16", "model.frozen_autocast=true").model
    )
    with pytest.raises(ValueError, match="needs autocast"):
        _trainer(tmp_path, max_steps=1, precision="32-true").fit(autocast, datamodule=_datamodule(cfg))
    fp16 = instantiate(make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=fp16").model)
    with pytest.raises(ValueError, match=r"fp16 needs trainer\.precision=16-mixed"):
        _trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(fp16, datamodule=_datamodule(cfg))
    with pytest.raises(ValueError, match="would cast the trainable adapter"):
        _trainer(tmp_path, max_steps=1, precision="bf16-true").fit(copy.deepcopy(module), datamodule=_datamodule(cfg))


def test_bf16_mixed_training_step_keeps_adapter_fp32(make_cfg, tmp_path, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=bf16")
    module = instantiate(cfg.model)
    trainer = _trainer(tmp_path, max_steps=2, precision="bf16-mixed")
    trainer.fit(module, datamodule=_datamodule(cfg))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, p in module.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


def _fit_on(module, batches, root, **kwargs):
    trainer = cpu_trainer(root, max_epochs=1, logger=False, **kwargs)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_nonfinite_loss_steps_are_skipped_and_counted(make_cfg, tmp_path, tiny_model_dir):
    # No LR schedule: Lightning still counts a skipped step (optimizer/scheduler counters advance, no weights move).
    cfg = make_cfg("experiment=demo_tiny", "data.batch_size=2", "model.nonfinite_patience=2", "model.lr_scheduler=null")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    good = list(itertools.islice(dm.train_dataloader(), 3))
    poisoned = {**good[0], "pixel_values": torch.full_like(good[0]["pixel_values"], float("nan"))}
    module = instantiate(cfg.model)
    reference = copy.deepcopy(module)
    trainer = _fit_on(module, [good[0], poisoned, good[1], good[2]], tmp_path / "a")
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    _fit_on(reference, good, tmp_path / "b")
    expected = _trainable(reference)
    for name, value in _trainable(module).items():  # the NaN step changed nothing
        assert torch.equal(value, expected[name]), name


def test_consecutive_nonfinite_losses_save_the_last_good_state_and_stop(make_cfg, tmp_path, tiny_model_dir):
    from camouflage_train.modules.light_module import NonFiniteLossError

    cfg = make_cfg("experiment=demo_tiny", "data.batch_size=2", "model.nonfinite_patience=2")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    good = next(iter(dm.train_dataloader()))
    poisoned = {**good, "pixel_values": torch.full_like(good["pixel_values"], float("nan"))}
    module = instantiate(cfg.model)
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses") as error:
        _fit_on(module, [good, poisoned, poisoned, good], tmp_path)
    saved = tmp_path / "nonfinite-stop.ckpt"
    assert str(saved) in str(error.value)
    state = torch.load(saved, map_location="cpu", weights_only=True)
    for name, value in _trainable(module).items():  # weights after the one good step
        assert torch.equal(state["state_dict"][name], value), name


@torch.no_grad()
def test_conditioning_and_attribute_gains_at_the_same_noise(tiny_module):
    """The gains are exactly zero when persons cannot act (adapter scale 0: the same computation twice, same noise
    and timesteps), non-zero when they can, and depend only on which persons (attributes) each image gets."""
    batch = _batch(tiny_module, size=3)
    first, again = tiny_module.validation_losses(batch, 0), tiny_module.validation_losses(batch, 0)
    assert set(first) == {"loss", "conditioning_gain", "attribute_gain"}
    assert {k: float(v) for k, v in first.items()} == {k: float(v) for k, v in again.items()}  # seeded
    assert float(first["conditioning_gain"]) != 0.0 and float(first["attribute_gain"]) != 0.0
    # Only the attributes move between persons: with every person's attributes equal, the attribute gain is 0.
    same = {
        **batch,
        "continuous": torch.zeros_like(batch["continuous"]),
        "categorical": torch.zeros_like(batch["categorical"]),
    }
    assert float(tiny_module.validation_losses(same, 0)["attribute_gain"]) == 0.0
    for processor in tiny_module.unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [0.0]
    no_effect = tiny_module.validation_losses(batch, 0)
    assert float(no_effect["conditioning_gain"]) == 0.0 and float(no_effect["attribute_gain"]) == 0.0
    tiny_module.hparams.conditioning_gains = False
    assert set(tiny_module.validation_losses(batch, 0)) == {"loss"}
    tiny_module.hparams.conditioning_gains = True
    one = {k: v[:1] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
    one["person_mask"] = torch.zeros_like(one["person_mask"])
    one["person_mask"][:, 0] = True
    assert set(tiny_module.validation_losses(one, 0)) == {"loss"}  # nobody to swap with


@pytest.mark.slow
def test_a_compiled_unet_gives_the_eager_loss_and_gradients(make_cfg, tiny_model_dir):
    """Regional compilation (model.compile_unet=blocks): compiled in place, parameter names unchanged, and a second
    batch of the same shape reuses every graph (dynamo with the ahead-of-time autograd
    backend over the whole UNet: the same loss and gradients as eager). What inductor itself generates is checked
    on one transformer block, the one kind of block the adapter lives in (CPU inductor: fused kernels reorder sums,
    so within float tolerance); compiling every block shape with inductor would only re-test torch."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    cfg = make_cfg("experiment=demo_tiny", "data.batch_size=2")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batches = list(itertools.islice(dm.train_dataloader(), 2))
    eager = instantiate(cfg.model)
    compiled = instantiate(cfg.model, compile_unet="blocks", compile_options={"backend": "aot_eager"})
    compiled.load_state_dict(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]

    def loss_and_grads(module, batch):
        module.zero_grad()
        loss = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}

    def assert_same(reference, other, rtol):
        torch.testing.assert_close(other[0], reference[0], rtol=rtol, atol=1e-5)
        for name, grad in reference[1].items():
            torch.testing.assert_close(other[1][name], grad, rtol=10 * rtol, atol=1e-5, msg=name)

    torch._dynamo.reset()
    counters.clear()  # graphs compiled by earlier tests in this process must not count
    for i, batch in enumerate(batches):
        assert_same(loss_and_grads(eager, batch), loss_and_grads(compiled, batch), rtol=1e-5)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs  # the second batch reused every graph

    reference = loss_and_grads(eager, batches[0])
    block = next(m for m in eager.unet.modules() if isinstance(m, BasicTransformerBlock))
    block.compile()  # inductor, the default backend
    assert_same(reference, loss_and_grads(eager, batches[0]), rtol=1e-4)
    torch._dynamo.reset()


def test_the_gains_move_persons_and_attributes_as_named():
    """Alone, without a model: the next image's persons; the next real person's attributes, boxes kept."""
    from camouflage_train.modules.conditioning_gains import (
        attributes_of_the_next_person,
        conditioning_gains,
        persons_of_the_next_image,
    )

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], [[0.1, 0.1, 0.2, 0.2], [0, 0, 0, 0]]])
    batch = {
        "boxes": boxes,
        "extents": boxes.clone(),
        "continuous": torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]]]),
        "categorical": torch.tensor([[[0], [1]], [[1], [0]]]),
        "person_mask": torch.tensor([[True, True], [True, False]]),
        "caption": ["a", "b"],
    }
    swapped = persons_of_the_next_image(batch)
    assert torch.equal(swapped["boxes"][0], boxes[1]) and torch.equal(
        swapped["person_mask"][1], batch["person_mask"][0]
    )
    assert swapped["caption"] == ["a", "b"]  # only the persons move
    passed = attributes_of_the_next_person(batch)
    assert torch.equal(passed["boxes"], boxes)
    assert passed["continuous"][batch["person_mask"]].flatten().tolist() == [3.0, 1.0, 2.0]
    assert passed["continuous"][1, 1].item() == 0.0  # padding untouched
    alone = {k: v[:1] for k, v in batch.items()}
    alone["person_mask"] = torch.tensor([[True, False]])
    assert persons_of_the_next_image(alone) is None and attributes_of_the_next_person(alone) is None
    gains = conditioning_gains(lambda b: b["continuous"].sum() + b["boxes"][0, 0, 0], batch, torch.tensor(6.1))
    assert set(gains) == {"conditioning_gain", "attribute_gain"}


def test_the_checkpoint_format_alone(tmp_path):
    """What the training module writes and export / the pipelines read, without a module."""
    from camouflage_train.models.adapter_checkpoint import (
        NotALightCheckpoint,
        adapter_metadata,
        check_trainable_keys,
        read_metadata,
        trainable_only,
    )

    meta = adapter_metadata(**_meta_args(tmp_path))
    assert (
        meta["format"] == 1
        and meta["adapter"]["embed_dim"] == 8
        and meta["ip_adapter_keys"] == {"down.attn2.processor": 1}
    )
    other = adapter_metadata(**{**_meta_args(tmp_path), "hyperparameters": {"lr": 2e-3}})
    assert meta["config_hash"] != other["config_hash"] and len(meta["config_hash"]) == 16
    assert read_metadata({"camouflage": meta}, "x.ckpt") is meta
    with pytest.raises(
        NotALightCheckpoint, match=r"x\.ckpt is a training checkpoint, but not of a CAMOUFLaGE-Light run"
    ):
        read_metadata({"camouflage": {"kind": "controlnet"}}, "x.ckpt")
    state = {"encoder.w": torch.ones(1), "unet.conv.weight": torch.ones(1)}
    assert list(trainable_only(state, ["encoder.w"])) == ["encoder.w"]
    check_trainable_keys(["encoder.w"], ["encoder.w"])
    with pytest.raises(ValueError, match=r"missing \['encoder.v'\], unexpected \['encoder.w'\]"):
        check_trainable_keys(["encoder.v"], ["encoder.w"])


def _meta_args(tmp_path):
    from camouflage_train.models.ip_adapter import AdapterConfig

    return dict(
        backbone_name="preset:tiny", backbone_source=tmp_path, schema={"max_persons": 2},
        adapter=AdapterConfig(embed_dim=8), ip_adapter_keys=[("down.attn2.processor", 1)], resolution=64,
        hyperparameters={"lr": 1e-3},
    )  # fmt: skip


def test_sample_grids_generate_from_the_batch_persons_with_the_module_being_trained(tiny_module):
    from camouflage_train.callbacks import SampleGrids
    from camouflage_train.pipelines.sampling import SAMPLING

    default = SampleGrids()
    assert (default.num_inference_steps, default.guidance_scale) == (
        SAMPLING.num_inference_steps,
        SAMPLING.guidance_scale,
    )
    grids = SampleGrids(num_images=2, num_inference_steps=2, guidance_scale=3.0, seed=4)
    batch = _batch(tiny_module, size=3)
    images = grids.generate(tiny_module, batch, 2)
    again = grids.generate(tiny_module, batch, 2)
    assert len(images) == 2 and images[0].size == (64, 64)
    # Exact: the very same computation twice in one process (same seeds, threads and batch).
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))


def test_the_outside_region_weight_changes_only_the_training_loss_and_only_outside_the_regions(tiny_module):
    """Weight 1 is the plain loss (the same computation); a lower weight changes the training loss, not the
    validation loss; images without persons keep the plain per-sample loss."""
    batch = _batch(tiny_module, size=2)

    def loss(training: bool) -> float:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            return float(tiny_module.diffusion_loss(batch, generator=generator, training=training))

    tiny_module.hparams.text_dropout = tiny_module.hparams.attribute_dropout = 0.0
    plain_training, plain_validation = loss(True), loss(False)
    tiny_module.hparams.outside_region_loss_weight = 0.1
    # Exact: the very same computation runs twice (validation never reads the weight).
    assert loss(False) == plain_validation
    assert loss(True) != plain_training
    nobody = dict(batch, person_mask=torch.zeros_like(batch["person_mask"]))
    with torch.no_grad():
        weighted = float(tiny_module.diffusion_loss(nobody, torch.Generator().manual_seed(3), training=True))
        tiny_module.hparams.outside_region_loss_weight = 1.0
        plain = float(tiny_module.diffusion_loss(nobody, torch.Generator().manual_seed(3), training=True))
    assert weighted == pytest.approx(plain, rel=1e-6)  # no regions: equal weights (another summation order)
    with pytest.raises(ValueError, match="outside_region_loss_weight"):
        instantiate_with(tiny_module, outside_region_loss_weight=2.0)


def instantiate_with(module, **overrides):
    """A module of ``module``'s hyperparameters with ``overrides`` (the optimizer partial is not a hyperparameter)."""
    from camouflage_train.modules.light_module import LightAdapterModule

    hparams = {**module.hparams, **overrides}
    return LightAdapterModule(optimizer=module.optimizer_factory, **hparams)


def test_compile_options_reach_torch_compile_checked_against_its_signature(make_cfg, tiny_model_dir):
    """model.compile_options are torch.compile's keyword arguments (CUDA graphs: mode=reduce-overhead); a key it
    does not take, or options without compile_unet, stop the run at construction, naming the key."""
    cfg = make_cfg("experiment=demo_tiny")
    module = instantiate(cfg.model, compile_unet="blocks", compile_options={"mode": "reduce-overhead"})
    assert module.hparams.compile_options == {"mode": "reduce-overhead"}
    with pytest.raises(InstantiationException, match=r"\['mood'\] are not torch.compile options"):
        instantiate(cfg.model, compile_unet="blocks", compile_options={"mood": "reduce-overhead"})
    with pytest.raises(InstantiationException, match="compile_unet is false"):
        instantiate(cfg.model, compile_options={"mode": "reduce-overhead"})
