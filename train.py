"""Train a policy: `python train.py loss=<name> model=<name> datasets=[a,b] exp_name=E`.

One process on CPU; one process per visible GPU (spawned) on a GPU node; under torchrun, the processes torchrun
made (many nodes). `++dry_run=true ++world_size=8` prints the per-GPU memory plan (feedbackalign/memory.py) and
exits without loading weights. The loss config names its Trainer subclass (trainers.py) and DataLoader
(dataloader.py); no code tests a loss's name. With no arguments it trains the embedded tiny model on the built-in task, offline.

Checks run in this order, each failing with one `train.py: error:` line naming the key to change, before
anything is written: the command line's names and keys (`configuration.check_command_line`, before Hydra
composes it: a typo such as `+betta=0.5` is not silently added), then the values, models, data, and last the run
directory (`builders.build_trainer`). Under torchrun only rank 0 prints. A run ends with a summary (final train
and held-out metrics, wall time, tokens/s, the paths of metrics.jsonl, LATEST and the HF export).
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

from feedbackalign import builders, distributed, memory, run_summary
from feedbackalign.configuration import CONFIG_DIR, check_command_line, halos_overrides
from feedbackalign.errors import USER_ERROR_EXIT, exit_on_user_error, warnings_as_lines
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
    summary = trainer.train()
    if tracking:
        import wandb

        wandb.finish()
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
        if cfg.dry_run:
            memory.dry_run(cfg)
        else:
            launch(cfg)


if __name__ == "__main__":
    launched = distributed.world_from_env()
    first = launched is None or launched[0] == 0   # torchrun: only rank 0 prints
    warnings_as_lines("train.py", show=first)
    with exit_on_user_error("train.py", show=first):
        sys.argv[1:] = halos_overrides(sys.argv[1:], "train.py")   # HALOs' keys (mode=train, ...) translated
        check_command_line(sys.argv[1:])                            # then every name and key checked
    main()
