"""Launched by tests/test_distributed.py under torchrun (2 processes, gloo, CPU): ``fsdp_worker.py OUT_DIR``.

The tiny reward model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` on every decoder layer and on the
whole model, applied directly: Accelerate drops an FSDP plugin on CPU) against an unsharded copy. Each rank writes
``OUT_DIR/rank{r}.json``: the largest gradient difference of the sharded model on its half of a batch (the FSDP
reduce-scatter averages the halves) from the unsharded model on the whole batch, relative to the gradient's largest
entry, per parameter; and whether a sharded checkpoint (``torch.distributed.checkpoint``) of the weights and the
AdamW state loaded into a fresh sharded model gives back every shard exactly; and whether the whole weights
gathered as the rm stage gathers them (``StateDictOptions(full_state_dict=True)``, accelerate's ``get_state_dict``)
and written by the rm stage's ``save_gathered`` load back equal to the shards all-gathered.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import set_seed

from distreward.data import PreferenceCollator, load_preference_data
from distreward.modeling import DistRewardForSequenceClassification
from distreward.reward_trainer import pair_loss_fn
from distreward.rm_trainer import save_gathered
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2)
LOSS = SimpleNamespace(loss_kind="bt_kl", sigma=0.1, score_weight=1.0, ops_backend="eager", margin_temperature=1.0)


def reward_model(tokenizer):
    set_seed(0)
    return DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL))


def shard(model, mesh):
    """FSDP2 as the Trainer's fsdp_version 2 wraps a Llama: each decoder layer, then the root."""
    for layer in model.backbone.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sharded_step(model):
    """An AdamW step (so the checkpoint holds optimizer state too) on a sharded model whose gradients are set."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()
    return optimizer


def main(out_dir: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    tokenizer = build_tiny_tokenizer()
    pairs = load_preference_data(tokenizer, num_pairs=50, eval_fraction=0.2, seed=0)["train"]
    batch = PreferenceCollator(tokenizer.pad_token_id)([pairs[i] for i in range(8)])  # one padding for both runs
    half = {key: value.chunk(world)[rank] for key, value in batch.items()}

    whole = reward_model(tokenizer)
    loss, _ = pair_loss_fn(LOSS, whole.centers)(whole, batch)
    loss.backward()
    expected = {name: parameter.grad for name, parameter in whole.named_parameters()}

    sharded = shard(reward_model(tokenizer), mesh)
    loss, _ = pair_loss_fn(LOSS, whole.centers)(sharded, half)
    loss.backward()
    gradient_error = {}
    for name, parameter in sharded.named_parameters():
        full = parameter.grad.full_tensor()  # the ranks' shards, all-gathered
        scale = expected[name].abs().max().clamp_min(1e-30)
        gradient_error[name] = ((full - expected[name]).abs().max() / scale).item()
    optimizer = sharded_step(sharded)

    checkpoint = os.path.join(out_dir, "checkpoint")
    model_state, optimizer_state = get_state_dict(sharded, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    fresh = shard(reward_model(tokenizer), mesh)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_model_state, fresh_optimizer_state = get_state_dict(fresh, fresh_optimizer)
    state = {"model": fresh_model_state, "optimizer": fresh_optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    weights_equal = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(sharded.parameters(),
                                                                                  fresh.parameters()))
    moments_equal = all(torch.equal(optimizer.state[a][key].to_local(), fresh_optimizer.state[b][key].to_local())
                        for a, b in zip(sharded.parameters(), fresh.parameters()) for key in ("exp_avg", "exp_avg_sq"))
    changed = any(not torch.equal(a.to_local(), b.to_local()) for a, b in zip(sharded.parameters(),
                                                                              shard(reward_model(tokenizer), mesh)
                                                                              .parameters()))
    # the rm stage's final save under FSDP2: accelerate's get_state_dict (the whole weights on every rank, on the
    # CPU) written by save_reward_model from rank 0; from_pretrained must read back the full tensors
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   cpu_offload=True))
    if rank == 0:
        save_gathered(sharded, tokenizer, os.path.join(out_dir, "saved"), full)
    dist.barrier()
    saved = DistRewardForSequenceClassification.from_pretrained(os.path.join(out_dir, "saved")).state_dict()
    names = [name for name, _ in sharded.named_parameters()]
    saved_equal = sorted(saved) == sorted(names) and all(
        torch.equal(saved[name], parameter.full_tensor()) for name, parameter in sharded.named_parameters())
    saved_files = sorted(os.listdir(os.path.join(out_dir, "saved")))
    local_numel = [parameter.to_local().numel() for parameter in sharded.parameters()]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"gradient_error": gradient_error, "weights_equal": weights_equal, "moments_equal": moments_equal,
                   "step_changed_weights": changed, "saved_equal": saved_equal, "saved_files": saved_files,
                   "local_numel": sum(local_numel),
                   "full_numel": sum(p.numel() for p in whole.parameters())}, handle)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
