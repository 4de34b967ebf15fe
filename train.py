"""Train a policy: `python train.py loss=<name> model=<name> datasets=[a,b] exp_name=E`.

One process on CPU; one process per visible GPU (spawned) on a GPU node; under torchrun, the processes torchrun
made (many nodes). The loss config names its Trainer subclass (trainers.py) and DataLoader (dataloader.py); no
code tests a loss's name. With no arguments it trains the embedded tiny model on the built-in task, offline.

Checks run in this order, each failing with one `train.py: error:` line naming the key to change, before
anything is written: the command line's names and keys (`configuration.check_command_line`, before Hydra
composes it: a typo such as `+betta=0.5` is not silently added), then the values, models, data, and last the run
directory (`builders.build_trainer`). Under torchrun only rank 0 prints. A run ends with a summary (final train
and held-out metrics, wall time, tokens/s, the paths of metrics.jsonl, LATEST and the HF export).
"""

from __future__ import annotations

import os
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from feedbackalign import builders, distributed, run_summary
from feedbackalign.configuration import CONFIG_DIR, check_command_line
from feedbackalign.errors import USER_ERROR_EXIT, exit_on_user_error, warnings_as_lines


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
    summary = trainer.train()
    if rank == 0:
        print(run_summary.render(summary), flush=True)


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
        launch(cfg)


if __name__ == "__main__":
    launched = distributed.world_from_env()
    first = launched is None or launched[0] == 0   # torchrun: only rank 0 prints
    warnings_as_lines("train.py", show=first)
    with exit_on_user_error("train.py", show=first):
        check_command_line(sys.argv[1:])
    main()
