import os
import stat

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from camouflage_train.data.cache import CachedLatentDataset
from camouflage_train.data.dataset import collate_skipping


def _datamodule(make_cfg, tmp_path, *overrides):
    cfg = make_cfg(
        "experiment=demo_tiny",
        "data.cache.enabled=true",
        "data.cache.dtype=fp32",
        f"data.cache.root={tmp_path}/latents",
        "data.train_source.num_samples=6",
        "data.batch_size=3",
        *overrides,
    )
    return cfg, instantiate(cfg.data)


def test_cached_training_equals_uncached(make_cfg, tmp_path, tiny_model_dir):
    cfg, dm = _datamodule(make_cfg, tmp_path)
    previous = os.umask(0o022)
    try:
        dm.prepare_data()
    finally:
        os.umask(previous)
    folder = dm.cache_folder()
    assert (folder / "meta.json").is_file()
    for path in [folder, *folder.rglob("*")]:  # shared caches are readable by colleagues (umask, not 0700/0600)
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    module = instantiate(cfg.model)
    raw = dm._dataset(dm.train_source, train=True)
    cached = CachedLatentDataset(folder, flip_prob=0.0)
    assert len(cached) == len(raw) == 6
    for flip in (0, 1):
        raw_items = [raw.variants(i, (bool(flip),))[0] for i in range(3)]
        cached_items = [cached.item(i, flip) for i in range(3)]
        raw_batch, cached_batch = collate_skipping(raw_items), collate_skipping(cached_items)
        for key in ("boxes", "continuous", "categorical", "person_mask"):
            assert torch.equal(raw_batch[key], cached_batch[key]), key
        for dropout in (False, True):
            module.hparams.text_dropout = module.hparams.attribute_dropout = 0.5 if dropout else 0.0
            a = module.diffusion_loss(raw_batch, generator=torch.Generator().manual_seed(3), training=dropout)
            b = module.diffusion_loss(cached_batch, generator=torch.Generator().manual_seed(3), training=dropout)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cache_key_follows_every_setting(make_cfg, tmp_path):
    base = _datamodule(make_cfg, tmp_path)[1].cache_folder()
    for override in (
        "data.resolution=32",
        "data.captions.template='people: {people}'",
        "data.flip_prob=0.0",
        "data.train_source.seed=5",
        "model.backbone.revision=abc",
        "data.cache.dtype=fp16",
        "attributes.max_persons=3",
    ):
        assert _datamodule(make_cfg, tmp_path, override)[1].cache_folder() != base, override
    assert _datamodule(make_cfg, tmp_path)[1].cache_folder() == base


def test_cache_refuses_random_crop_and_incomplete_folders(make_cfg, tmp_path, tiny_model_dir):
    with pytest.raises(Exception, match="random_crop=false"):
        _datamodule(make_cfg, tmp_path, "data.random_crop=true")
    _, dm = _datamodule(make_cfg, tmp_path)
    folder = dm.cache_folder()
    folder.mkdir(parents=True)
    (folder / "latent_mean.npy").write_bytes(b"half")
    with pytest.raises(ValueError, match=r"not a usable latent cache: no meta\.json"):
        CachedLatentDataset(folder)
    dm.prepare_data()  # the leftover is replaced by a complete cache
    assert len(CachedLatentDataset(folder)) == 6
    # A complete cache whose array was truncated afterwards is never read as valid: refused, then rebuilt.
    text = folder / "text.npy"
    text.write_bytes(text.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"text\.npy is 1000 bytes, \d+ were written"):
        CachedLatentDataset(folder)
    dm.prepare_data()
    assert len(CachedLatentDataset(folder)) == 6


@pytest.mark.slow
def test_training_from_cache(make_cfg, tmp_path, tiny_model_dir):
    from camouflage_train.training import run_training

    cfg, _ = _datamodule(
        make_cfg,
        tmp_path,
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "data.val_source.num_samples=2",
        "logger=csv",
    )
    metrics = run_training(cfg)
    assert np.isfinite(metrics["train/loss"]) and metrics["data/train_skipped"] == 0
