"""Bad inputs to distributed runs fail early, with messages that say what to change."""

import pytest
import torch

from _distributed import torchrun, train_here

from scalejepa.config import ConfigError, load_config
from scalejepa.dist_env import DistEnv
from scalejepa.train import main


def test_batch_not_divisible_by_world_size_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    # 6 images over 2 ranks x 2 accumulation steps.
    proc = torchrun(run_dir, 2, "distributed.backend=fsdp2", "train.batch_size=6", check=False, timeout=200)
    assert proc.returncode != 0
    assert "train.batch_size=6 is not divisible by world size x train.grad_accum = 2 x 2" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_missing_checkpoint_fails_on_every_rank(tmp_path):
    proc = torchrun(tmp_path / "run", 2, "distributed.backend=fsdp2", resume=str(tmp_path / "nowhere" / "step_00000003"),
                    check=False, timeout=200)
    assert proc.returncode != 0
    assert proc.stderr.count("no such checkpoint directory") == 2, proc.stderr[-3000:]


def test_unknown_backend_is_a_config_error(tmp_path, capsys):
    assert train_here(tmp_path / "run", "distributed.backend=megatron") == 2
    err = capsys.readouterr().err
    assert "distributed.backend='megatron' is not allowed; choose one of: none, fsdp2, deepspeed" in err


def test_several_processes_need_a_distributed_backend(tmp_path, capsys, monkeypatch):
    from scalejepa import train as train_module

    monkeypatch.setattr(train_module, "init_distributed",
                        lambda device: DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    monkeypatch.setattr(train_module, "shutdown_distributed", lambda: None)
    assert train_here(tmp_path / "run", "train.steps=1") == 2
    assert "distributed.backend=none" in capsys.readouterr().err


def test_hsdp_group_must_divide_the_world():
    from scalejepa.parallel.fsdp import build_mesh

    with pytest.raises(ConfigError, match="shard_group_size=3 must divide the world size 4"):
        build_mesh(DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")), 3)


def test_distributed_init_errors_are_raised_not_swallowed(tmp_path, monkeypatch):
    """torchrun-style environment without a rendezvous address: the error surfaces."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        main(["--config", "debug_cpu", "--run-dir", str(tmp_path / "run"), "distributed.backend=fsdp2"])
    assert not torch.distributed.is_initialized()


def test_backend_choice_reaches_the_config():
    assert load_config("debug_cpu", ["distributed.backend=deepspeed"]).distributed.backend == "deepspeed"
