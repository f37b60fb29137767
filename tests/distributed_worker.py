"""Launched by tests/test_distributed.py under torchrun: ``distributed_worker.py RUNS.json``.

RUNS.json lists ``python -m distreward.train`` command lines to run in turn in this process (one
launch pays the ~10 s of imports once). A run may name ``kill_at``: the rl stage's ``compute_loss``
call at which every rank raises, standing in for the job being killed; and ``record_dir``: each rank
writes there what the test compares across ranks, ``rank{r}.json`` (per step: the prompts this rank
trained on, its seed, its local mean total reward, the baseline it used and the EMA value after the step) and
``rank{r}.safetensors`` (its final policy weights); and ``grads_dir``: each rank writes there the gradients
each optimizer step receives (:func:`recorded_gradients`).
"""
import contextlib
import json
import os
import sys
from unittest import mock

import torch
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from distreward import cli
from distreward.rl_trainer import ReinforceTrainer


class Killed(Exception):
    """Raised on every rank at the same step: the run stops as a killed job would."""


@contextlib.contextmanager
def instrumented_reinforce(record_dir=None, kill_at=None):
    """Patch :class:`ReinforceTrainer` to record per-rank steps and weights into ``record_dir`` and to
    raise :class:`Killed` at ``compute_loss`` call ``kill_at``."""
    compute_loss, train_policy = ReinforceTrainer.compute_loss, ReinforceTrainer.train
    steps = []

    def recorded_compute_loss(self, model, prompts):
        if len(steps) + 1 == kill_at:
            raise Killed
        loss, metrics = compute_loss(self, model, prompts)
        steps.append({"prompts": prompts, "seed": torch.initial_seed(), "total_reward": metrics["total_reward"].item(),
                      "baseline": metrics["baseline"].item(), "ema": self.baseline.state_dict().get("value")})
        return loss, metrics

    def recorded_train(self):
        policy = train_policy(self)
        if record_dir is not None:
            rank = self.accelerator.process_index
            os.makedirs(record_dir, exist_ok=True)
            with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
                json.dump(steps, handle)
            save_file({name: tensor.detach().clone() for name, tensor in policy.state_dict().items()},
                      os.path.join(record_dir, f"rank{rank}.safetensors"))
        return policy

    with mock.patch.object(ReinforceTrainer, "compute_loss", recorded_compute_loss), \
            mock.patch.object(ReinforceTrainer, "train", recorded_train):
        yield


@contextlib.contextmanager
def recorded_gradients(directory=None):
    """Write the gradients every optimizer step receives (all-reduced and clipped: what AdamW is given) to
    ``directory/rank{r}_step{k}.safetensors``, keyed by the parameter's position in the optimizer (fp32)."""
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    steps = []

    def record(optimizer, args, kwargs):
        steps.append(len(steps) + 1)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        save_file({str(i): p.grad.detach().clone() for i, p in enumerate(parameters) if p.grad is not None},
                  os.path.join(directory, f"rank{rank}_step{steps[-1]}.safetensors"))

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()


def main(runs_path: str) -> int:
    with open(runs_path) as handle:
        runs = json.load(handle)
    for run in runs:
        with instrumented_reinforce(run.get("record_dir"), run.get("kill_at")), \
                recorded_gradients(run.get("grads_dir")):
            try:
                code = cli.main(run["argv"])
            except Killed:
                continue
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
