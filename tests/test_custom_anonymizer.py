"""A new anonymization method is one class with the common call plus one config file: anonymize.py and
evaluate.py run it with no change to the framework (docs/anonymization.md's "Adding an anonymizer" example)."""

import json
import textwrap

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camouflage_train.anonymization import run_anonymization
from camouflage_train.data.synthetic import draw_scene
from camouflage_train.evaluation import run_evaluation
from tests.conftest import REPO

METHOD = '''
from PIL import Image


class Pixelate:
    """Replace every person box by coarse blocks."""

    def __init__(self, block: int = 8) -> None:
        self.block = block

    def __call__(self, images, persons, seeds, prompts):
        out = []
        for image, boxes, mask in zip(images, persons.boxes.tolist(), persons.mask.tolist()):
            image = image.copy()
            width, height = image.size
            for (x0, y0, x1, y1), real in zip(boxes, mask):
                region = (int(x0 * width), int(y0 * height), max(int(x1 * width), 1), max(int(y1 * height), 1))
                if real and region[2] > region[0] and region[3] > region[1]:
                    crop = image.crop(region)
                    small = crop.resize((max(crop.width // self.block, 1), max(crop.height // self.block, 1)))
                    image.paste(small.resize(crop.size, Image.NEAREST), region[:2])
            out.append(image)
        return out

    def to(self, device):
        return self
'''


@pytest.fixture
def user_method(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = tmp_path / "my_configs" / "anonymize" / "model"
    configs.mkdir(parents=True)
    (configs / "pixelate.yaml").write_text("_target_: my_methods.Pixelate\nblock: 8\n")
    return tmp_path / "my_configs"


def test_a_users_method_runs_in_anonymize_and_evaluate(user_method, tmp_path, schema, tiny_faces_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        draw_scene(i, schema, 64)[0].save(folder / f"{i}.png")
    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
        cfg = compose(
            "anonymize.yaml",
            overrides=[
                f"hydra.searchpath=[file://{REPO / 'configs'},file://{user_method / 'anonymize'}]",
                "model=pixelate",
                "faces=mini",  # finds the drawn people (the random tiny pack finds none: nothing would be written)
                "bodies=none",
                "resolution=64",
                "num_workers=0",
                f"input.folder={folder}",
                f"output={tmp_path / 'out'}",
            ],
        )
    assert run_anonymization(cfg)["done"] == 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["status"] == "done" for r in rows)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate.yaml",
            overrides=[
                "experiment=eval_tiny",
                f"hydra.searchpath=[file://{user_method}]",
                "+anonymize/model@anonymizers.pixelate=pixelate",
                "rows=[identity,pixelate]",
                f"paths.output_dir={tmp_path / 'eval'}",
                "logger=csv",
            ],
        )
    results = run_evaluation(cfg)
    assert [r["model"] for r in results] == ["identity", "pixelate"]
    assert results[1]["fid"] > results[0]["fid"]  # it did change the images
    grid = np.asarray(Image.open(tmp_path / "eval" / "samples" / "batch_000.png"))
    assert grid.shape[1] > 3 * 64  # original | identity | pixelate
