"""Train a policy: `python train.py loss=<name> model=<name> datasets=[a,b] exp_name=E`.

One process on CPU; one process per visible GPU (spawned) on a GPU node; under torchrun, the processes torchrun
made (many nodes). `++dry_run=true ++world_size=8` prints the per-GPU memory plan (feedbackalign/memory.py) and
exits without loading weights. The loss config names its Trainer subclass (trainers.py) and DataLoader (dataloader.py); no
code tests a loss's name. With no arguments it trains the embedded tiny model on the built-in task, offline.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from feedbackalign import builders, distributed, memory
from feedbackalign.configuration import CONFIG_DIR, halos_overrides
from feedbackalign.errors import USER_ERROR_EXIT, exit_on_user_error
from feedbackalign.fileio import write_json_atomic

WANDB_RUN_FILE = "wandb.json"  # in the run directory: the W&B run a resume continues


def worker(rank: int, local_rank: int, world_size: int, cfg: DictConfig) -> None:
    device = distributed.init(rank, local_rank, world_size)
    try:
        run(cfg, rank, world_size, device)
    finally:
        distributed.shutdown()


def start_wandb(cfg: DictConfig, run_dir: Path) -> None:
    """The run's W&B run, its id kept in <run_dir>/wandb.json so that `resume=true` continues the same W&B run
    (resume="allow"). Points are plotted against `examples` (W&B's own step only ever grows), so the steps a
    resumed run logs again after its checkpoint sit beside the first attempt's instead of being dropped."""
    import wandb

    record = run_dir / WANDB_RUN_FILE
    run_id = json.loads(record.read_text())["id"] if record.is_file() else uuid.uuid4().hex[:12]
    write_json_atomic(record, {"id": run_id, "entity": cfg.wandb.entity, "project": cfg.wandb.project})
    wandb.init(entity=cfg.wandb.entity, project=cfg.wandb.project, name=cfg.exp_name, id=run_id, resume="allow",
               config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir))
    wandb.define_metric("examples")
    wandb.define_metric("*", step_metric="examples")


def run(cfg: DictConfig, rank: int, world_size: int, device: torch.device) -> None:
    trainer = builders.build_trainer(cfg, rank, world_size, device)
    tracking = cfg.wandb.enabled and rank == 0
    if tracking:
        start_wandb(cfg, trainer.run_dir)
    trainer.train()
    if tracking:
        import wandb

        wandb.finish()
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
    with exit_on_user_error("train.py"):  # HALOs' keys (mode=train, human_prefix=...) translated or refused
        sys.argv[1:] = halos_overrides(sys.argv[1:], "train.py")
    main()
