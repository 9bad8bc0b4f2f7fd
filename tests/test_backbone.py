import shutil
import time

import open_clip
import pytest
import torch

from camouflage_train.models.backbone import BackboneUnavailableError, load_frozen_backbone


def test_tiny_preset_loads_frozen_with_real_clip_tokenizer(tiny_model_dir):
    backbone = load_frozen_backbone("preset:tiny", weight_dtype="bf16")
    assert backbone.source == tiny_model_dir
    assert len(backbone.tokenizer) == 49408 and backbone.tokenizer.model_max_length == 77
    prompts = ["a photo of a 34 year old woman, smiling!", "two people on a beach"]
    ours = backbone.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")(prompts)
    for row, ref in zip(ours, reference, strict=True):
        n = int((ref != 0).sum())
        assert torch.equal(row[:n], ref[:n])
    for module in backbone.modules().values():
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in module.parameters())


def test_missing_hub_model_fails_fast_with_instructions():
    start = time.monotonic()
    with pytest.raises(BackboneUnavailableError) as err:
        load_frozen_backbone("someone/not-a-model-xyz")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "someone/not-a-model-xyz" in message and "pretrained_model_name_or_path=<folder>" in message


def test_missing_local_folder_and_bad_folder(tmp_path):
    with pytest.raises(BackboneUnavailableError, match="does not exist"):
        load_frozen_backbone(str(tmp_path / "nope"))
    with pytest.raises(BackboneUnavailableError, match="not a diffusers Stable Diffusion folder"):
        load_frozen_backbone(str(tmp_path))


def test_broken_tokenizer_is_refused_not_silently_replaced(tiny_model_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer" / "vocab.json").unlink()
    (broken / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BackboneUnavailableError, match="has 2 tokens, expected the CLIP vocabulary"):
        load_frozen_backbone(str(broken))
