"""Ctrl-C / SIGTERM during training: the loop finishes the optimizer step under way, saves a checkpoint there and
raises TrainingInterrupted; --resume from it ends as an uninterrupted run; the command line says so in one line
and exits 130."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from distreward.trainer_utils import (TrainingConfig, TrainingInterrupted, list_checkpoints, make_accelerator,
                                      train_loop)


class Regression(torch.nn.Linear):
    """A linear model that checkpoints as train_loop expects (``save_pretrained`` writing model.safetensors)."""

    def save_pretrained(self, directory):
        save_file(self.state_dict(), os.path.join(directory, "model.safetensors"))


def train(tmp_path, name, signals_at=None, signum=signal.SIGINT, resume=False):
    """train_loop on a small linear regression (8 optimizer steps of 2 micro-batches); ``signals_at`` maps a
    micro-step to the number of signals sent while it computes its loss. Returns (config, trained model)."""
    config = TrainingConfig(output_dir=str(tmp_path / name), max_steps=8, per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, logging_steps=1, save_steps=100, learning_rate=1e-2,
                            seed=0, resume=resume)
    accelerator = make_accelerator(config)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(24, 3, generator=generator)
    data = DataLoader(TensorDataset(inputs, inputs @ torch.tensor([1.0, -2.0, 0.5])), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    model, calls = Regression(3, 1), []

    def compute_loss(model, batch):
        calls.append(1)
        for _ in range((signals_at or {}).get(len(calls), 0)):
            signal.raise_signal(signum)
        features, targets = batch
        return torch.nn.functional.mse_loss(model(features)[:, 0], targets), {}

    return config, train_loop(config, accelerator, model, data, compute_loss)


def metrics(config):
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_that_resumes_exactly(tmp_path, signum):
    straight_config, straight = train(tmp_path, "straight")
    before = signal.getsignal(signum)  # SIG_IGN where the tests run in a background job, else Python's own
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tmp_path, "stopped", signals_at={5: 1}, signum=signum)  # micro-step 5 opens optimizer step 3
    checkpoint = os.path.join(tmp_path, "stopped", "checkpoint-3")
    assert stopped.value.checkpoint == checkpoint and list_checkpoints(tmp_path / "stopped") == [checkpoint]
    assert signal.getsignal(signum) == before  # the loop's handler is gone
    config, resumed = train(tmp_path, "stopped", resume=True)
    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert metrics(config) == metrics(straight_config)


def test_a_second_signal_interrupts_at_once_and_the_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        train(tmp_path, "twice", signals_at={5: 2})
    assert not isinstance(interrupted.value, TrainingInterrupted)
    assert list_checkpoints(tmp_path / "twice") == []  # no half-updated state is saved
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_line_saves_says_how_to_resume_in_one_line_and_exits_130(tmp_path, signum):
    output_dir = tmp_path / "sft"
    argv = ["sft", "--num_pairs", "200", "--max_steps", "100000", "--logging_steps", "1", "--output_dir",
            str(output_dir)]
    environment = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "distreward.train", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment)
    metrics_path = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics_path.exists() and metrics_path.read_text()) and process.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    (checkpoint,) = list_checkpoints(output_dir)
    progress_bar = "sft: "  # tqdm's bar, on stderr as usual
    assert [line for line in stderr.splitlines() if line.strip() and not line.startswith(progress_bar)] == [
        f"interrupted: saved {checkpoint}; `python -m distreward.train {' '.join(argv)} --resume` continues from it"]
