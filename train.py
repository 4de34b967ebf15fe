"""Train a policy: `python train.py loss=<name> model=<name> datasets=[a,b] exp_name=E`.

One process on CPU; one process per visible GPU (spawned) on a GPU node; under torchrun, the processes torchrun
made (many nodes). `++dry_run=true ++world_size=8` prints the per-GPU memory plan (feedbackalign/memory.py) and
exits without loading weights. The loss config names its Trainer subclass (trainers.py) and DataLoader (dataloader.py); no
code tests a loss's name. With no arguments it trains the embedded tiny model on the built-in task, offline.
"""

from __future__ import annotations

import os
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from feedbackalign import builders, distributed, memory
from feedbackalign.configuration import CONFIG_DIR
from feedbackalign.errors import USER_ERROR_EXIT, exit_on_user_error


def worker(rank: int, local_rank: int, world_size: int, cfg: DictConfig) -> None:
    device = distributed.init(rank, local_rank, world_size)
    try:
        run(cfg, rank, world_size, device)
    finally:
        distributed.shutdown()


def run(cfg: DictConfig, rank: int, world_size: int, device: torch.device) -> None:
    trainer = builders.build_trainer(cfg, rank, world_size, device)
    if cfg.wandb.enabled and rank == 0:
        import wandb

        wandb.init(entity=cfg.wandb.entity, project=cfg.wandb.project, name=cfg.exp_name,
                   config=OmegaConf.to_container(cfg, resolve=True), dir=str(trainer.run_dir))
    trainer.train()
    if rank == 0:
        print(f"done: {trainer.run_dir / 'LATEST'}", flush=True)


def spawned(local_rank: int, world_size: int, cfg: DictConfig, port: int) -> None:
    """One GPU's process on a single node; a user-caused failure prints its one line and exits 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with exit_on_user_error("train.py"):
        worker(local_rank, local_rank, world_size, cfg)


def launch(cfg: DictConfig) -> None:
    """torchrun's processes, else one per visible GPU, else one CPU process."""
    env = distributed.world_from_env()
    if env is not None:
        worker(*env, cfg)
    elif torch.cuda.device_count() > 1:
        import torch.multiprocessing as mp

        n = torch.cuda.device_count()
        try:
            mp.spawn(spawned, args=(n, cfg, distributed.free_port()), nprocs=n, join=True)
        except mp.ProcessExitedException:
            sys.exit(USER_ERROR_EXIT)  # the failing process printed why
    else:
        run(cfg, 0, 1, distributed.init(0, 0, 1))


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("train.py"):
        if cfg.dry_run:
            memory.dry_run(cfg)
        else:
            launch(cfg)


if __name__ == "__main__":
    main()
