"""Streamed shards (``make_shards.py``, ``data=streaming``): the map-style samples, over ranks, resumed, refused.

The shards are written once per module from the demo's synthetic scenes (16 training, 4 validation images, small
chunks so that ranks and workers get several each).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from camouflage_train.data.sampling import sample_seed
from camouflage_train.data.streaming import META_NAME, StreamingPersonDataModule, write_shards
from camouflage_train.errors import DataError
from tests.conftest import REPO, assert_user_error, compose_train, run_script

TRAIN, VAL, SEED = 16, 4, 42
DATA = ("experiment=demo_tiny", f"data.train_source.num_samples={TRAIN}", f"data.val_source.num_samples={VAL}")


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return compose_train(tmp_path_factory.mktemp("cfg"), *DATA, f"seed={SEED}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Written by the command a user runs (writer processes forked: no second start-up of the libraries)."""
    out = tmp_path_factory.mktemp("shards") / "demo"
    run = tmp_path_factory.mktemp("shards_run")
    args = (*DATA, f"seed={SEED}", f"output={out}", "chunk_bytes=6kB", "start_method=fork", f"hydra.run.dir={run}")
    done = run_script("make_shards.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    again = run_script("make_shards.py", *args)  # a second run does not replace what is there
    assert_user_error(again, f"output: {out} already holds shards", "overwrite=true")
    return out


def _streaming(data_cfg, input_dir, **overrides) -> StreamingPersonDataModule:
    data = data_cfg.data
    settings = dict(
        schema=data_cfg.attributes, resolution=data.resolution, random_crop=data.random_crop,
        flip_prob=data.flip_prob, min_visible=data.min_visible, captions=dict(data.captions), batch_size=4,
        seed=SEED,
    )  # fmt: skip
    module = StreamingPersonDataModule(str(input_dir), **{**settings, **overrides})
    module.setup("fit")
    return module


def _epoch(loader) -> list[dict]:
    """One epoch's samples, unbatched: name, seed, pixels, boxes, caption."""
    rows = []
    for batch in loader:
        for i in range(batch["size"]):
            rows.append(
                {
                    "name": batch["name"][i],
                    "seed": batch["sample_seed"][i],
                    "pixels": batch["pixel_values"][i],
                    "boxes": batch["boxes"][i],
                    "caption": batch["caption"][i],
                }
            )
    return rows


def _map_style_epoch0(data_cfg) -> dict[str, dict]:
    """The map-style training split's samples of epoch 0, by name, with their keys' seeds."""
    module = instantiate(data_cfg.data)
    module.setup("fit")
    rows = {}
    for position in range(len(module.train_set)):
        item = module.train_set[(position, sample_seed(SEED, 0, position))]
        rows[item["name"]] = item
    return rows


def _assert_map_style_samples(rows: list[dict], reference: dict[str, dict]) -> None:
    assert sorted(row["name"] for row in rows) == sorted(reference)  # each image once
    for row in rows:
        expected = reference[row["name"]]
        assert row["seed"] == expected["sample_seed"], row["name"]
        # The same pixels (a lossless PNG of the decoded image) through the same transforms, in the same process on
        # the same threads: the same computation run twice, so exactly equal.
        assert torch.equal(row["pixels"], expected["pixel_values"]), row["name"]
        assert torch.equal(row["boxes"], expected["boxes"]) and row["caption"] == expected["caption"], row["name"]


def test_streamed_shards_serve_the_map_style_samples_with_their_seeds(shards, data_cfg):
    module = _streaming(data_cfg, shards)
    rows = _epoch(module.train_dataloader())
    _assert_map_style_samples(rows, _map_style_epoch0(data_cfg))
    assert [b["size"] for b in module.val_dataloader()] == [4]
    meta = json.loads((shards / META_NAME).read_text())
    assert meta["splits"] == {
        "train": {"items": TRAIN, "skipped_before": {}},
        "val": {"items": VAL, "skipped_before": {}},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_epoch(rank: int, world: int, port: int, data_cfg, input_dir: str, out: str) -> None:
    torch.set_num_threads(1)  # a forked process must not enter its parent's OpenMP pool (as in DataLoader workers)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    module = _streaming(data_cfg, input_dir, batch_size=2)
    rows = [{"name": r["name"], "seed": r["seed"]} for r in _epoch(module.train_dataloader())]
    Path(out).write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def test_two_ranks_stream_exactly_the_samples_of_one_process(shards, data_cfg, tmp_path):
    """Two gloo processes each read a share; together, each image once, with the seed one process gives it."""
    one = {(r["name"], r["seed"]) for r in _epoch(_streaming(data_cfg, shards, batch_size=4).train_dataloader())}
    context, port = multiprocessing.get_context("fork"), _free_port()
    processes = [
        context.Process(target=_rank_epoch, args=(r, 2, port, data_cfg, str(shards), str(tmp_path / f"{r}.json")))
        for r in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    shares = [{(r["name"], r["seed"]) for r in json.loads((tmp_path / f"{r}.json").read_text())} for r in range(2)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]  # no image on both ranks
    assert shares[0] | shares[1] == one and len(one) == TRAIN


def _lightning_epoch(loader, skip: int = 0) -> list[tuple[str, int]]:
    """One epoch as Lightning's fit loop takes it: ``len(loader)`` batches (less the ``skip`` a resumed epoch had
    trained), without running the iterator to its end."""
    batches = iter(loader)
    taken = [next(batches) for _ in range(len(loader) - skip)]
    return [(name, seed) for batch in taken for name, seed in zip(batch["name"], batch["sample_seed"], strict=True)]


def test_a_restored_loader_continues_at_the_next_unseen_sample_and_then_starts_the_next_epoch(shards, data_cfg):
    straight_loader = _streaming(data_cfg, shards).train_dataloader()
    straight = [_lightning_epoch(straight_loader) for _ in range(2)]
    assert {s for _, s in straight[0]}.isdisjoint({s for _, s in straight[1]})  # each epoch its own seeds
    loader = _streaming(data_cfg, shards).train_dataloader()
    first, batches = [], iter(loader)
    for _ in range(2):
        batch = next(batches)
        first += list(zip(batch["name"], batch["sample_seed"], strict=True))
    state = loader.state_dict()
    resumed = _streaming(data_cfg, shards).train_dataloader()  # a new process would build a new loader
    resumed.load_state_dict(state)
    assert first + _lightning_epoch(resumed, skip=2) == straight[0]  # the unseen rest, with its seeds
    assert _lightning_epoch(resumed) == straight[1]  # then a whole new epoch, not the restored one again


def test_shards_written_for_other_settings_are_refused_before_training(shards, data_cfg, tmp_path):
    with pytest.raises(DataError, match="another attribute schema"):
        _streaming(data_cfg, shards, schema={**data_cfg.attributes, "max_persons": 2})
    with pytest.raises(DataError, match="holds no latents"):
        _streaming(data_cfg, shards, random_crop=False, cache={"enabled": True, "backbone": {}})
    with pytest.raises(DataError, match=r"cannot be read.*make_shards\.py"):
        _streaming(data_cfg, tmp_path / "nothing")
    small = tmp_path / "small"
    write_shards(instantiate(compose_train(tmp_path, *DATA).data), str(small), shorter_side=64, start_method="fork")
    with pytest.raises(DataError, match=r"shorter side 64, below data\.resolution=128"):
        _streaming(data_cfg, small, resolution=128)


def test_two_machines_write_one_set_of_shards(data_cfg, tmp_path):
    """Each machine writes its share of the training split as a part; the last waits for every part, merges them and
    writes the record. Here the two "machines" run one after the other on one shared folder."""
    out = tmp_path / "shared"
    settings = {"chunk_bytes": "6kB", "start_method": "fork", "batch_size": 4, "num_nodes": 2}
    write_shards(instantiate(data_cfg.data), str(out), node_rank=0, **settings)
    assert not (out / META_NAME).exists()  # not finished until the last machine has merged
    write_shards(instantiate(data_cfg.data), str(out), node_rank=1, **settings)
    assert not (out / "parts").exists()
    _assert_map_style_samples(_epoch(_streaming(data_cfg, out).train_dataloader()), _map_style_epoch0(data_cfg))


def test_a_shard_item_that_does_not_decode_is_skipped_and_counted(shards, data_cfg, tmp_path):
    damaged = tmp_path / "damaged"
    for split in ("train", "val"):
        (damaged / split).mkdir(parents=True)
        for file in (shards / split).iterdir():
            (damaged / split / file.name).write_bytes(file.read_bytes())
    (damaged / META_NAME).write_bytes((shards / META_NAME).read_bytes())
    chunk = sorted((damaged / "train").glob("*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    start = data.index(b"\x89PNG")  # the first image's bytes: its header and first blocks become noise
    data[start : start + 64] = bytes(range(64))
    chunk.write_bytes(bytes(data))
    batches = list(_streaming(data_cfg, damaged).train_dataloader())
    skipped = sum(sum(b["skipped"].values()) for b in batches)
    assert skipped == 1 and sum(b["size"] for b in batches) == TRAIN - 1
    assert [reason for b in batches for reason in b["skipped"]] == ["not an image"]


@pytest.mark.slow
def test_shards_stream_from_an_object_store(data_cfg, tmp_path, monkeypatch):
    """A real S3 API (moto's server, from the package registry) holds the shards; training reads them from it."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import litdata.streaming.downloader as downloader

    # obstore, litdata's fast path, refuses plain-HTTP endpoints and litdata passes it no allow-HTTP option; the local
    # server speaks HTTP only, so reads and writes go through litdata's boto3 client (the same S3 requests).
    monkeypatch.setattr(downloader, "_OBSTORE_AVAILABLE", False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        options = {
            "endpoint_url": f"http://127.0.0.1:{server._port}", "aws_access_key_id": "test",
            "aws_secret_access_key": "test", "region_name": "us-east-1",
        }  # fmt: skip
        boto3.client("s3", **options).create_bucket(Bucket="shards")
        write_shards(
            instantiate(data_cfg.data), "s3://shards/demo", chunk_bytes="6kB", start_method="fork",
            storage_options=options,
        )  # fmt: skip
        module = _streaming(data_cfg, "s3://shards/demo", storage_options=options, cache_dir=str(tmp_path / "chunks"))
        _assert_map_style_samples(_epoch(module.train_dataloader()), _map_style_epoch0(data_cfg))
    finally:
        server.stop()


def test_latents_in_the_shards_are_the_latent_cache(data_cfg, tmp_path, tiny_model_dir):
    """Shards written with latents serve what the map-style latent cache serves, under the same key."""
    from camouflage_train.data.cache import CachedLatentDataset

    cfg = compose_train(
        tmp_path, *DATA, f"seed={SEED}", f"paths.cache_dir={tmp_path / 'cache'}", "data.cache.enabled=true"
    )
    mapped = instantiate(cfg.data)
    mapped.prepare_data()  # builds the latent cache
    mapped.setup("fit")
    assert isinstance(mapped.train_set, CachedLatentDataset)
    write_shards(
        instantiate(cfg.data), str(tmp_path / "shards"), chunk_bytes="64kB", start_method="fork",
        latents={"backbone": dict(cfg.model.backbone), "dtype": "fp16", "device": "cpu",
                 "encoder_loader": instantiate(cfg.data.encoder_loader)},
    )  # fmt: skip
    cache = {"enabled": True, "backbone": dict(cfg.model.backbone), "dtype": "fp16"}
    module = _streaming(cfg, tmp_path / "shards", cache=cache)
    position_of = {sample_seed(SEED, 0, p): p for p in range(TRAIN)}
    seen = 0
    for batch in module.train_dataloader():
        for i, seed in enumerate(batch["sample_seed"]):
            expected = mapped.train_set[(position_of[seed], seed)]
            # The same VAE on the same pixels, in batches of other sizes: float sums may differ in the last bits
            # before both are rounded to fp16.
            for key in ("latent_mean", "latent_std", "text_embeds"):
                torch.testing.assert_close(batch[key][i], expected[key], atol=2e-3, rtol=2e-3)
            # the boxes were moved by the writer process (one thread) and by this one: element-wise, to rounding
            torch.testing.assert_close(batch["boxes"][i], expected["boxes"], atol=1e-6, rtol=0)
            seen += 1
    assert seen == TRAIN
    with pytest.raises(DataError, match=r"made with other settings.*dtype"):
        _streaming(cfg, tmp_path / "shards", cache={**cache, "dtype": "fp32"})


RUN = (
    "experiment=demo_tiny", "data=streaming", "data.resolution=64", "data.random_crop=false", "data.num_workers=0",
    "data.pin_memory=false", "data.batch_size=2", "logger=csv", "trainer.limit_val_batches=0",
    "trainer.deterministic=true", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.strategy=ddp", "trainer.devices=2",
)  # fmt: skip


def _train(run_dir: Path, shards: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *RUN, f"data.input_dir={shards}", f"hydra.run.dir={run_dir}"]


def _adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_a_killed_two_process_streaming_run_resumes_to_the_uninterrupted_adapter(shards, tmp_path):
    """2 ranks x batch 2 over 16 images: 4 steps an epoch; killed after step 2's checkpoint (mid-epoch), resumed.

    The straight and the resumed run start as a user's command does (forked from the test's server); the killed one
    in a process group of its own, so that the rank its launcher started dies with it."""
    straight = tmp_path / "straight"
    done = run_script("train.py", *_train(straight, shards)[2:])
    assert done.returncode == 0, done.stderr[-4000:]

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        _train(crashed, shards), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and the rank it started: one process group, killed together
    )  # fmt: skip
    marker, deadline = crashed / "checkpoints/step_0000002.ckpt", time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "checkpoints/step_0000004.ckpt").exists()
    done = run_script("train.py", *_train(crashed, shards)[2:])
    assert done.returncode == 0, done.stderr[-4000:]

    # Lightning started the second process itself (re-running train.py): one output folder, written by rank 0 only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed", "straight"]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt",
    ]  # fmt: skip
    assert len(list(straight.rglob(".hydra"))) == 1 and len(list(straight.glob("*.json"))) == 1  # metrics.json
    assert not (REPO / ".hydra").exists() and not (REPO / "checkpoints").exists()
    expected, got = _adapter(straight / "checkpoints/last.ckpt"), _adapter(crashed / "checkpoints/last.ckpt")
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    print(f"largest |w_resumed - w_straight| after 4 steps on 2 processes: {worst:.3g}")
    assert worst <= 1e-5  # the DDP tolerance of the map-style tests
    losses = {}
    for run in (straight, crashed):
        rows = (run / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        column, step = header.index("train/loss_step"), header.index("step")
        losses[run.name] = [(r.split(",")[step], r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    # The steps trained after the resume have the uninterrupted run's losses: the same samples, seeds and weights.
    straight_losses = dict(losses["straight"])
    resumed = [(step, loss) for step, loss in losses["crashed"] if int(step) >= 2]
    assert [step for step, _ in resumed] == ["2", "3"]
    for step, loss in resumed:
        assert float(loss) == pytest.approx(float(straight_losses[step]), rel=1e-5), step
