"""OpenRLHF's remote reward through the reward server (:mod:`distreward.serve`); no model in this process.

Two ways in, the same answer (docs/integrations.md, "Reward server"):

- the server's own route: ``--reward.remote_url http://127.0.0.1:8000/openrlhf``;
- this file as OpenRLHF's custom reward function: ``--reward.remote_url /path/to/distreward/integrations/openrlhf.py``
  with ``DISTREWARD_SERVER_URL`` set (OpenRLHF loads :func:`reward_func` from a ``.py`` path).

The contract, as read in OpenRLHF v0.11.0 (github.com/OpenRLHF/OpenRLHF, commit 3c3be62):
``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``: the query is the policy's prompt and response tokens
decoded with ``skip_special_tokens=False``; ``_fetch_rewards_via_http`` POSTs
``{"query": [...], "prompts": [...], "labels": [...]}`` and ``execute`` reads ``rewards``, ``scores`` (the
dynamic-filtering score, ``rewards`` when absent) and ``extra_logs`` from the JSON answer; a ``.py`` remote URL
loads ``reward_func(queries, prompts, labels)`` instead, whose dict answer is read the same way
(``examples/python/reward_func.py``). ``openrlhf/cli/serve_rm.py`` answers
``{"rewards": r, "scores": r, "extra_logs": {...}}`` with lists, as :func:`openrlhf_reply` does. Releases before
v0.10 sent the same request from ``openrlhf/utils/remote_rm_utils.py`` (flag ``--remote_rm_url``).
"""
from distreward.integrations.client import score


def openrlhf_reply(result: dict) -> dict:
    """The reward server's ``/score`` answer as OpenRLHF reads it: ``rewards`` and ``scores`` (the server's
    rewards), ``extra_logs`` with the reward model's mean and std (lists, one entry per query)."""
    return {"rewards": result["rewards"], "scores": result["rewards"],
            "extra_logs": {"rm_mean": result["mean"], "rm_std": result["std"]}}


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF's custom reward function: the server's rewards for ``queries`` (rendered prompt + response texts);
    ``prompts`` and ``labels`` are not read (the reward model reads the whole query)."""
    return openrlhf_reply(score({"texts": list(queries)}))
