"""Two processes on the gloo backend (torchrun on this CPU) against one process on the same global batch.

One torchrun launch of ``distributed_worker.py`` runs the rm and rl stages' command lines in turn
(imports are paid once); a second launch resumes the killed rl run through ``-m distreward.train``.
Equivalence: per-device batch b on 2 processes (with gradient accumulation for rm) computes the same
first step as one process with the whole global batch: the same gradients reach AdamW and the same
metrics are logged, up to fp32 rounding (:data:`FP32_TOL`). Greedy decoding makes the rollouts of a
prompt the same in both, so the rl comparison checks the reductions (EMA baseline, gradients,
metrics), not sampling noise; a sampled run checks what must hold across ranks whatever they sample.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from distributed_worker import recorded_gradients
from run_files import jsonl_without_timings
from distreward.distributed import call_in_forward, check_data_parallel
from distreward.modeling import DistRewardForSequenceClassification, save_reward_model
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer
from distreward.cli import main

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
FSDP_WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2)
EQUAL_LENGTH_PROMPTS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 1), (2, 7), (8, 3), (6, 6), (4, 9),
                                                            (9, 5), (7, 2), (3, 8))]
EMA_DECAY = 0.5
LAUNCH_TIMEOUT_S = 300
# Two fp32 evaluations of the same sums in other orders (two half batches all-reduced vs one whole batch, other
# matmul blockings) differ by about n * eps * sum(|terms|) for a sum of n terms (eps = 2**-23). The longest sums here
# (batch x tokens, the MLP width, the vocabulary) have a few hundred terms, whose size a tensor's largest entry gives:
FP32_TOL = 2 ** 9 * torch.finfo(torch.float32).eps  # 6.1e-5, relative to that size


def torchrun(*args: str) -> None:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port is picked); fail with its output.

    The processes import the ``distreward`` of this checkout, as this test does (not another installed copy)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def rm_argv(models, output_dir, per_device: int, accumulation: int) -> list:
    return ["rm", "--model_name_or_path", str(models / "sft"), "--num_pairs", "40", "--eval_fraction", "0.2",
            "--max_steps", "2", "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps",
            str(accumulation), "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "100",
            "--output_dir", str(output_dir)]


def rl_argv(models, output_dir, *flags: str) -> list:
    """The rl stage's flags; the ema baseline unless ``flags`` name another (the last --baseline wins)."""
    return ["rl", "--policy_path", str(models / "sft"), "--reward_model_path", str(models / "rm"),
            "--num_eval_prompts", "2", "--eval_samples_per_prompt", "1", "--max_new_tokens", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--baseline", "ema", "--output_dir", str(output_dir),
            *flags]


def greedy_rl_argv(models, output_dir, per_device: int) -> list:
    return rl_argv(models, output_dir, "--dataset_name", str(models / "prompts.jsonl"), "--num_train_prompts", "8",
                   "--temperature", "0", "--samples_per_prompt", "1", "--max_steps", "2", "--save_steps", "100",
                   "--per_device_train_batch_size", str(per_device))


def sampled_rl_argv(models, output_dir, *flags: str) -> list:
    """On the embedded task, whose rl runs end with the sharpened-SFT baseline: two temperatures, 8 validation
    prompts."""
    return rl_argv(models, output_dir, "--num_train_prompts", "16", "--samples_per_prompt", "2", "--max_steps", "3",
                   "--save_steps", "2", "--per_device_train_batch_size", "2", "--ema_decay", str(EMA_DECAY),
                   "--sharpening_grid", "1.0", "0.0", "--sharpening_prompts", "8", *flags)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny 'SFT' policy, a reward model on it (saved as the sft / rm stages save them) and a prompt file
    whose prompts all tokenise to the same length (no padding: batched and split greedy rollouts agree)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_policy(tokenizer, seed=3, **SMALL)
    policy.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    torch.manual_seed(0)
    reward_model = DistRewardForSequenceClassification.from_backbone(policy)
    reward_model.head.weight.data.mul_(3)  # rewards that differ between responses (x30 saturates the top bin)
    save_reward_model(reward_model, tokenizer, root / "rm")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EQUAL_LENGTH_PROMPTS))
    return root


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Output directories of the 2-process runs; the rl run killed after checkpoint-2 is resumed by a new launch."""
    root = tmp_path_factory.mktemp("two_processes")
    plan = [{"argv": rm_argv(models, root / "rm", per_device=2, accumulation=2), "grads_dir": str(root / "rm_grads")},
            {"argv": greedy_rl_argv(models, root / "rl_greedy", per_device=2), "grads_dir": str(root / "rl_grads")},
            {"argv": sampled_rl_argv(models, root / "rl_whole"), "record_dir": str(root / "record_ema")},
            {"argv": sampled_rl_argv(models, root / "rl_killed"), "kill_at": 3}]
    for baseline in ("rloo", "batch"):
        plan.append({"argv": sampled_rl_argv(models, root / f"rl_{baseline}", "--baseline", baseline, "--max_steps", "1",
                                             "--save_steps", "100"), "record_dir": str(root / f"record_{baseline}")})
    (root / "runs.json").write_text(json.dumps(plan))
    torchrun(WORKER, str(root / "runs.json"))
    assert os.path.isdir(root / "rl_killed" / "checkpoint-2") and not os.path.exists(root / "rl_killed" / "policy")
    # --keep_checkpoints: test_rank_zero_alone_writes_metrics_and_checkpoints reads the finished run's checkpoint
    torchrun("-m", "distreward.train", *sampled_rl_argv(models, root / "rl_killed", "--resume", "--keep_checkpoints"))
    return root


def read_metrics(run_dir) -> list:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_call_in_forward_runs_the_function_inside_the_forward_call_and_restores_it():
    for patched in (False, True):
        model, pre_forward = torch.nn.Linear(2, 2), []
        if patched:  # an instance-level forward, as accelerate's mixed-precision wrapper sets
            model.forward = torch.nn.Linear.forward.__get__(model)
        instance_forward = model.__dict__.get("forward")
        model.register_forward_pre_hook(lambda module, args: pre_forward.append(args))
        out = call_in_forward(model, lambda module, x: module.weight.sum() * x, torch.tensor(2.0))
        assert out == 2 * model.weight.sum() and len(pre_forward) == 1  # ran as the forward, hooks around it
        assert model.__dict__.get("forward") is instance_forward
        assert torch.equal(model(torch.ones(2)), model.weight.sum(-1) + model.bias)


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM])
def test_sharded_engines_are_refused_with_a_clear_error(engine):
    with pytest.raises(ValueError, match=f"{engine.value} is not supported yet"):
        check_data_parallel(SimpleNamespace(distributed_type=engine))
    for data_parallel in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_data_parallel(SimpleNamespace(distributed_type=data_parallel))


def assert_same_first_step_gradients(two_dir, one_dir) -> None:
    """The gradients AdamW is given at step 1 (all-reduced, clipped): identical on both ranks, and equal to one
    process's on the whole batch up to fp32 rounding, entry by entry (:data:`FP32_TOL` x the tensor's largest entry).

    Later steps are not compared: AdamW's first updates are about ``lr * sign(gradient)``, so an entry
    near 0 whose sign rounding decides moves a weight by up to ``lr`` in one run and not in the other.
    """
    ranks = [load_file(two_dir / f"rank{rank}_step1.safetensors") for rank in (0, 1)]
    one = load_file(one_dir / "rank0_step1.safetensors")
    assert ranks[0].keys() == ranks[1].keys() == one.keys()
    for name, expected in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"parameter {name}: the ranks differ (not all-reduced)"
        torch.testing.assert_close(ranks[0][name], expected, rtol=0, atol=FP32_TOL * expected.abs().max().item(),
                                   msg=lambda message: f"gradient of parameter {name}: {message}")


def assert_same_first_step_metrics(two: list, one: list, names: tuple) -> None:
    """Both runs logged steps 1 and 2 (the 2-process run once, by rank 0) with the same learning rates, and the
    same step-1 ``names`` (averaged over ranks and micro-batches) up to fp32 rounding."""
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
    assert [m["lr"] for m in two] == pytest.approx([m["lr"] for m in one], rel=FP32_TOL)
    for name in names:
        assert two[0][name] == pytest.approx(one[0][name], rel=FP32_TOL, abs=FP32_TOL), name


def test_rm_steps_match_one_process_on_the_same_global_batch(models, runs, tmp_path):
    # 2 processes x 2 pairs x 2 accumulated micro-batches == 1 process x 8 pairs
    with recorded_gradients(tmp_path / "grads"):
        assert main(rm_argv(models, tmp_path, per_device=8, accumulation=1)) == 0
    assert_same_first_step_gradients(runs / "rm_grads", tmp_path / "grads")
    trained, initial = load_file(tmp_path / "model.safetensors"), load_file(models / "rm" / "model.safetensors")
    assert not torch.allclose(trained["backbone.embed_tokens.weight"], initial["backbone.embed_tokens.weight"])
    assert_same_first_step_metrics(read_metrics(runs / "rm"), read_metrics(tmp_path), ("loss", "accuracy", "mean_std"))


def test_rl_steps_match_one_process_on_the_same_global_batch(models, runs, tmp_path):
    with recorded_gradients(tmp_path / "grads"):
        assert main(greedy_rl_argv(models, tmp_path, per_device=4)) == 0
    assert_same_first_step_gradients(runs / "rl_grads", tmp_path / "grads")
    # Not "loss": advantage-weighted log-probabilities whose advantages nearly cancel; its gradient is compared above.
    assert_same_first_step_metrics(read_metrics(runs / "rl_greedy"), read_metrics(tmp_path),
                                   ("reward", "total_reward", "baseline", "kl"))
    two, one = (json.load(open(run / "eval.json"))["sft"] for run in (runs / "rl_greedy", tmp_path))
    assert two["reward"] == pytest.approx(one["reward"], rel=FP32_TOL, abs=FP32_TOL)
    assert two["kl_to_ref"] == pytest.approx(one["kl_to_ref"], rel=FP32_TOL, abs=FP32_TOL)


def read_records(runs, baseline: str) -> list:
    """Per rank, per step: prompts, seed, local mean total reward, baseline used, EMA value (distributed_worker.py)."""
    return [json.load(open(runs / f"record_{baseline}" / f"rank{rank}.json")) for rank in (0, 1)]


def test_rl_ranks_sample_their_own_prompts_and_share_the_ema_baseline(runs):
    ranks = read_records(runs, "ema")
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert ranks[0][0]["seed"] != ranks[1][0]["seed"]  # each rank samples its rollouts from its own stream
    ema = None
    for step0, step1 in zip(*ranks):
        assert not set(step0["prompts"]) & set(step1["prompts"])  # data sharded per rank
        assert step0["total_reward"] != step1["total_reward"]  # so a rank-local baseline would differ
        global_mean = (step0["total_reward"] + step1["total_reward"]) / 2
        baseline = global_mean if ema is None else ema
        assert step0["baseline"] == step1["baseline"] == pytest.approx(baseline, rel=1e-5)
        ema = EMA_DECAY * baseline + (1 - EMA_DECAY) * global_mean
        assert step0["ema"] == step1["ema"] == pytest.approx(ema, rel=1e-5)
    weights = [load_file(runs / "record_ema" / f"rank{rank}.safetensors") for rank in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name  # gradients were all-reduced


def test_rl_batch_baseline_is_the_global_mean_and_rloo_groups_stay_within_a_rank(runs):
    (batch0,), (batch1,) = read_records(runs, "batch")
    assert batch0["total_reward"] != batch1["total_reward"]
    global_mean = (batch0["total_reward"] + batch1["total_reward"]) / 2
    assert batch0["baseline"] == batch1["baseline"] == pytest.approx(global_mean, rel=1e-5)
    # Over whole groups, the leave-one-out baselines average to the groups' mean reward: the rank's own.
    (rloo0,), (rloo1,) = read_records(runs, "rloo")
    assert rloo0["total_reward"] != rloo1["total_reward"]
    for step in (rloo0, rloo1):
        assert step["baseline"] == pytest.approx(step["total_reward"], rel=1e-5)


def test_rank_zero_alone_writes_metrics_and_checkpoints(runs):
    assert [m["step"] for m in read_metrics(runs / "rl_whole")] == [1, 2, 3]
    checkpoint = runs / "rl_killed" / "checkpoint-2"
    assert {"model.safetensors", "trainer_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= set(
        os.listdir(checkpoint))


def test_resumed_two_process_run_continues_where_it_stopped(runs):
    whole, resumed = runs / "rl_whole", runs / "rl_killed"
    resumed_weights, whole_weights = (load_file(run / "policy" / "model.safetensors") for run in (resumed, whole))
    for name in whole_weights:
        assert torch.equal(resumed_weights[name], whole_weights[name]), name
    assert jsonl_without_timings(resumed / "metrics.jsonl") == jsonl_without_timings(whole / "metrics.jsonl")
    assert json.load(open(resumed / "eval.json")) == json.load(open(whole / "eval.json"))


def test_fsdp2_sharded_gradients_and_checkpoint(tmp_path):
    """FSDP2 (fully_shard on each decoder layer and the whole reward model, 2 processes, gloo): each rank holds about
    half the weights; the gradients of the two half batches, reduce-scattered, equal the unsharded model's on the
    whole batch up to fp32 rounding; a torch.distributed.checkpoint of the sharded weights and AdamW state, taken
    after a step, loads into a fresh sharded model shard for shard, exactly; the whole weights gathered as the rm stage
gathers them and saved as it saves them (save_gathered) read back exactly (fsdp_worker.py)."""
    torchrun(FSDP_WORKER, str(tmp_path))
    ranks = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    for rank in ranks:
        assert rank["local_numel"] < 0.6 * rank["full_numel"]  # sharded, not replicated
        assert len(rank["gradient_error"]) == 22 and max(rank["gradient_error"].values()) < FP32_TOL, \
            rank["gradient_error"]
        assert rank["step_changed_weights"] and rank["weights_equal"] and rank["moments_equal"]
        assert rank["saved_equal"]  # the whole model, gathered from the shards, saved and read back
        assert rank["saved_files"] == ["README.md", "config.json", "model.safetensors", "modeling_distreward.py",
                                       "tokenizer.json", "tokenizer_config.json"]  # no FSDP source files
