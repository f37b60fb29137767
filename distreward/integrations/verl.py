"""verl's custom reward function through the reward server (:mod:`distreward.serve`); no model in this process.

Set ``DISTREWARD_SERVER_URL`` (the URL ``python -m distreward.serve`` prints) and, in verl's config::

    custom_reward_function.path=pkg://distreward.integrations.verl
    custom_reward_function.name=compute_score          # or compute_score_batch with reward_model.reward_manager=batch

The contract, as read in verl 0.8.0.dev (github.com/volcengine/verl, commit b178a3c):
``verl/utils/reward_score/__init__.py`` ``default_compute_score(data_source, solution_str, ground_truth,
extra_info=None, ...)`` returns a float or a dict with ``score``; ``verl/trainer/ppo/reward.py``
``get_custom_reward_fn`` loads ``custom_reward_function.name`` from ``custom_reward_function.path`` (a file or
``pkg://module``) and adds ``custom_reward_function.reward_kwargs``; ``verl/workers/reward_manager/naive.py`` calls
it per sample with the response alone (decoded with ``skip_special_tokens=True``) and keeps every key of a dict
answer in ``reward_extra_info``; ``verl/workers/reward_manager/batch.py`` calls it once per batch as
``compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **reward_kwargs)``.

verl does not pass the prompt, so it is read from ``extra_info[prompt_key]``: ``question`` by default (verl's
``examples/data_preprocess/gsm8k.py`` stores the user question there), another key through
``custom_reward_function.reward_kwargs.prompt_key``. The prompt is a user message string or a chat message list;
the server renders it with the response as the RL stage does.
"""
from typing import Optional

from distreward.integrations.client import score


def prompt_of(extra_info: Optional[dict], prompt_key: str):
    """The prompt stored under ``prompt_key`` in a sample's ``extra_info`` (ValueError naming the keys present)."""
    if not extra_info or prompt_key not in extra_info:
        present = sorted(extra_info) if extra_info else []
        raise ValueError(f"distreward's verl reward reads the prompt from extra_info[{prompt_key!r}], which this "
                         f"sample lacks (extra_info keys: {present}); store it in the dataset or set "
                         f"custom_reward_function.reward_kwargs.prompt_key")
    return extra_info[prompt_key]


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, prompt_key: str = "question",
                        url: Optional[str] = None, **kwargs) -> list:
    """One server request for a batch: a dict per sample, ``score`` (the server's reward), ``rm_mean`` and
    ``rm_std``. ``data_sources`` and ``ground_truths`` are not read; ``kwargs`` (verl's extra arguments) neither."""
    prompts = [prompt_of(extra_info, prompt_key) for extra_info in extra_infos]
    result = score({"prompts": prompts, "completions": list(solution_strs)}, url=url)
    return [{"score": reward, "rm_mean": mean, "rm_std": std}
            for reward, mean, std in zip(result["rewards"], result["mean"], result["std"])]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, prompt_key: str = "question",
                  url: Optional[str] = None, **kwargs) -> dict:
    """verl's per-sample reward: ``{"score", "rm_mean", "rm_std"}`` for one response (:func:`compute_score_batch`)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], prompt_key, url)[0]
