"""A tiny COCO-style person detector in the real format (transformers YOLOS, ``save_pretrained``), for tests and
demos: the stand-in behind ``bodies=tiny``.

The folder is what ``hf download hustvl/yolos-tiny`` gives (``config.json`` with an ``id2label`` that names
``person``, ``preprocessor_config.json``, ``model.safetensors``), so
:class:`~camouflage_train.annotation.bodies.BodyDetector` runs its real loading, detection and post-processing on
it. The weights are random (seeded): every detection token gets its own box, and the class head leans towards
``person`` so that some boxes pass a detection threshold. The boxes mean nothing; they exercise the code path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from camouflage_train.utils.atomic import atomic_folder

# The hub's COCO detectors name class 1 "person" (class 0 is the unused "N/A" of COCO's 91 ids).
TINY_LABELS = {0: "N/A", 1: "person", 2: "bicycle"}
FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def build_tiny_body_detector(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny detector and its image processor into ``folder`` (atomically) unless they are there; return
    the folder.

    Args:
        folder: the detector's folder.
        seed: the random weights' seed.
    """
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    folder = Path(folder)
    if all((folder / name).is_file() for name in FILES):
        return folder
    config = YolosConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=[64, 64],
        patch_size=16,
        num_detection_tokens=8,
        id2label=TINY_LABELS,
        label2id={label: i for i, label in TINY_LABELS.items()},
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the model's own initialisation leaves the global generator alone
        torch.manual_seed(seed)
        model = YolosForObjectDetection(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # matrices of unit gain; norms and biases as initialised
            if parameter.dim() >= 2 and "layernorm" not in name.lower():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
        # The heads' last layers: class scores leaning towards "person" with a spread (some boxes pass a threshold,
        # some do not), boxes that differ per detection token and are person-sized.
        classes, boxes = model.class_labels_classifier.layers[-1], model.bbox_predictor.layers[-1]
        classes.weight.copy_(torch.randn(classes.weight.shape, generator=generator) * 0.5)
        classes.bias.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))  # N/A, person, bicycle, no object
        boxes.weight.copy_(torch.randn(boxes.weight.shape, generator=generator) * 0.5)
        boxes.bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.5]))  # centre x, centre y, width, height (logits)
    with atomic_folder(folder, replace=True) as staging:
        model.save_pretrained(staging)
        YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(staging)
    return folder


def tiny_body_detector(cache_dir: str | Path) -> str:
    """The tiny detector's folder under ``cache_dir`` (built on first use): the config factory behind
    ``bodies=tiny``.

    Args:
        cache_dir: where the detector is built.
    """
    return str(build_tiny_body_detector(Path(cache_dir) / "bodies-tiny-v1"))
