"""FSDP with a bf16 frozen backbone and an fp32 adapter inside its blocks (configs/trainer/fsdp.yaml).

Lightning's FSDP strategy refuses the CPU, but torch's FSDP runs on it with ``device_id=cpu`` and gloo: the
two-process test wraps the tiny Light module with the config's own wrap policy and takes training steps. A real
GPU run (Lightning's strategy, NCCL) is the command in docs/scaling.md.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from hydra.utils import instantiate
from omegaconf import OmegaConf

from camouflage_train.models.sharding import MixedDtypeUnitError, _remainder_dtypes, plan_units
from tests.conftest import REPO

BLOCKS = (BasicTransformerBlock, ResnetBlock2D)


@pytest.fixture
def bf16_module(make_cfg, tiny_model_dir):
    return instantiate(make_cfg("experiment=demo_tiny", "model.backbone.weight_dtype=bf16").model)


def test_block_wrapping_alone_mixes_dtypes_and_the_plan_separates_them(bf16_module):
    kinds = {(p.dtype, p.requires_grad) for p in bf16_module.parameters()}
    assert kinds == {(torch.bfloat16, False), (torch.float32, True)}
    blocks = {m for m in bf16_module.modules() if isinstance(m, BLOCKS)}
    mixed = [m for m in blocks if len(_remainder_dtypes(m, blocks)) > 1]
    assert mixed, "the adapter no longer sits inside the UNet's blocks: this test no longer shows the problem"
    units = plan_units(bf16_module, BLOCKS)
    for unit in [bf16_module, *units]:
        assert len(_remainder_dtypes(unit, units)) == 1
    trainable_units = [u for u in units if all(p.requires_grad for p in u.parameters())]
    covered = {id(p) for u in trainable_units for p in u.parameters()}
    assert covered == {id(p) for p in bf16_module.parameters() if p.requires_grad}


def test_a_unit_that_cannot_be_separated_is_named(bf16_module):
    bf16_module.unet.conv_in.bias.data = bf16_module.unet.conv_in.bias.data.float()  # fp32 inside a bf16 layer
    with pytest.raises(MixedDtypeUnitError, match=r"'the root' .*'unet\.conv_in' hold\(s\) torch\.float32"):
        plan_units(bf16_module, BLOCKS)


WORKER = r"""
import os, sys, torch, torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(0)
with initialize_config_dir(config_dir=r"{configs}", version_base="1.3"):
    cfg = compose("train.yaml", overrides=["experiment=demo_tiny", "trainer=fsdp", "model.backbone.weight_dtype=bf16",
                                           "paths.output_dir=" + sys.argv[3]])
module = instantiate(cfg.model)
strategy = cfg.trainer.strategy
policy = instantiate(strategy.auto_wrap_policy)
before = {{n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}}
module.forward = lambda batch: module.diffusion_loss(batch, training=True)  # what Lightning redirects to
wrapped = FSDP(module, auto_wrap_policy=policy, use_orig_params=strategy.use_orig_params,
               sharding_strategy=ShardingStrategy[strategy.sharding_strategy], device_id=torch.device("cpu"))
data = instantiate(cfg.data)
data.setup("fit")
batch = next(iter(data.train_dataloader()))
optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
for _ in range(2):
    loss = wrapped(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
assert torch.isfinite(loss), loss
with FSDP.summon_full_params(wrapped):
    after = {{n.replace("_fsdp_wrapped_module.", ""): p for n, p in module.named_parameters()}}
    changed = sum(not torch.equal(after[n], p) for n, p in before.items())
    checksum = torch.tensor([float(sum(after[n].double().sum() for n in before))])
sums = [torch.zeros(1, dtype=checksum.dtype) for _ in range(2)]
dist.all_gather(sums, checksum)
print("UNITS", sum(isinstance(m, FSDP) for m in wrapped.modules()), "CHANGED", changed, "of", len(before),
      "SUMS", sums[0].item(), sums[1].item(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_cpu_processes_train_the_adapter_under_fsdp_with_the_config_policy(tmp_path, tiny_model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    script = WORKER.format(configs=REPO / "configs")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), port, str(tmp_path / str(rank))],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]
    report = next(line.split() for line in outputs[0].splitlines() if line.startswith("UNITS"))
    units, changed, total = int(report[1]), int(report[3]), int(report[5])
    assert units > 10 and changed == total > 0  # every adapter tensor trained
    assert float(report[7]) == pytest.approx(float(report[8]), rel=1e-6)  # both ranks hold the same weights


def test_the_fsdp_config_uses_the_uniform_dtype_policy():
    trainer = OmegaConf.load(REPO / "configs" / "trainer" / "fsdp.yaml")
    assert trainer.strategy.auto_wrap_policy._target_ == "camouflage_train.models.sharding.UniformDtypeWrapPolicy"
