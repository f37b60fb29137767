"""The models: :func:`load_policy` loads a causal LM and its tokenizer; the distributional reward model of
docs/math.md §1 is :class:`~distreward.modeling_distreward.DistRewardForSequenceClassification` (a Hugging Face
model: a causal-LM body and a K-bin softmax head, or, as a baseline, a scalar head).

:func:`save_reward_model` writes it as transformers does (``config.json`` with an ``auto_map``,
``model.safetensors``, the self-contained ``modeling_distreward.py``), its tokenizer and a model card, so
``AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)`` loads it without
distreward (docs/integrations.md). :func:`load_reward_model` also reads the format before it
(``reward_model_config.json`` beside ``model.safetensors``), converting it on load.
"""
import copy
import json
import os
from typing import Optional

from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distreward.data import EMBEDDED, local_path_or_hub_id
from distreward.modeling_distreward import (DistRewardConfig, DistRewardForSequenceClassification,  # noqa: F401
                                            RewardOutput, last_token_index)
from distreward.run_files import (GENERATION_CONFIG_NAME, LEGACY_CONFIG_NAME, MODEL_CONFIG_NAME, SFT_CONFIG_NAME,
                                  TOKENIZER_CONFIG_NAME, WEIGHTS_NAME)
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer

MODEL_CARD = """---
library_name: transformers
tags: [reward-model, distributional-reward-model, distreward]
---
# Distributional reward model (distreward)

A causal-LM body ({backbone}) with a head of {num_bins} logits over the bins `linspace({low}, {high}, {num_bins})`
on the hidden state of each sequence's last real token (read from the attention mask): the softmax of the logits is
a distribution over the reward, its mean E is the reward and its std the uncertainty. Trained by
`python -m distreward.train rm` (settings: `rm_config.json`, held-out metrics: `eval.json`, where present).

Outputs of `model(input_ids, attention_mask)`:

- `logits` [B, 1] float32: the reward E (the score reward-bench and TRL read from a sequence classifier);
- `bin_logits` [B, K] float32: the head's logits over the bins;
- `mean`, `std` [B] float32: the distribution's mean (= `logits[:, 0]`) and std.

A scalar head (`"head": "scalar"` in `config.json`) has `bin_logits` [B, 1] equal to `logits`, and std 0.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained(PATH, trust_remote_code=True)  # eval mode
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # transformers 5 reads config.json
text = tokenizer.apply_chat_template(messages, tokenize=False)  # the conversation to score, ending with the answer
batch = tokenizer([text], return_tensors="pt", padding=True, add_special_tokens=False)
output = model(**batch)
reward, uncertainty = output.mean, output.std
```

With distreward installed, `import distreward` registers the classes, and the Auto classes need no
`trust_remote_code`.
"""


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id or directory; one without a pad token pads with its EOS (as SmolLM2 needs)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reward_model_format(path: str):
    """``"hf"`` (a saved :class:`DistRewardForSequenceClassification`), ``"legacy"`` (``reward_model_config.json``
    beside ``model.safetensors``, the format before it) or None for a directory that holds no reward model."""
    path = os.path.expanduser(path)
    config_path = os.path.join(path, MODEL_CONFIG_NAME)
    if os.path.isfile(config_path):
        with open(config_path) as handle:
            if json.load(handle).get("model_type") == DistRewardConfig.model_type:
                return "hf"
    return "legacy" if os.path.isfile(os.path.join(path, LEGACY_CONFIG_NAME)) else None


def load_legacy_reward_model(path: str) -> DistRewardForSequenceClassification:
    """A reward model saved in the format before the Hugging Face model (``reward_model_config.json``: the head
    settings and ``backbone_config``; ``model.safetensors``: ``backbone.*`` and ``head.*``, the names the model
    keeps), in eval mode. Its ``save_pretrained`` then writes the current format."""
    with open(os.path.join(path, LEGACY_CONFIG_NAME)) as handle:
        model = DistRewardForSequenceClassification(DistRewardConfig(**json.load(handle)))
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.eval()


def save_tokenizer(tokenizer, directory: str) -> None:
    """``tokenizer.save_pretrained(directory)`` in a form transformers 4.5x reads too: transformers 5 names a
    tokenizer.json-only tokenizer's class ``TokenizersBackend`` (4.x has no such class: it is 4.x's
    ``PreTrainedTokenizerFast``) and writes the chat template to ``chat_template.jinja``, which goes into
    ``tokenizer_config.json`` here, where every version reads it."""
    tokenizer.save_pretrained(directory)
    config_path = os.path.join(directory, TOKENIZER_CONFIG_NAME)
    with open(config_path) as handle:
        settings = json.load(handle)
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings.pop("backend", None)  # transformers 5's choice of backend ("tokenizers", its default)
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path) as handle:
            settings["chat_template"] = handle.read()
        os.remove(template_path)
    with open(config_path, "w") as handle:
        json.dump(settings, handle, indent=2, ensure_ascii=False)


def save_reward_model(model: DistRewardForSequenceClassification, tokenizer, directory: str,
                      state_dict: Optional[dict] = None) -> None:
    """Write ``model`` (``config.json`` with ``auto_map``, ``model.safetensors``, ``modeling_distreward.py``), its
    tokenizer (:func:`save_tokenizer`) and a model card ``README.md`` into ``directory``. ``state_dict``: the
    weights to write instead of ``model``'s own (a sharded model's, gathered whole)."""
    model.save_pretrained(directory, state_dict=state_dict)
    save_tokenizer(tokenizer, directory)
    config = model.config
    with open(os.path.join(directory, "README.md"), "w") as handle:
        handle.write(MODEL_CARD.format(backbone=config.backbone_config.model_type, num_bins=config.num_bins,
                                       low=config.low, high=config.high))


def refuse_reward_model(path: str) -> None:
    """ValueError when ``path`` is a reward model's directory where a policy (a causal LM) is expected."""
    if reward_model_format(path) is not None:
        raise ValueError(f"{path} holds a reward model, not a policy: give the sft stage's output directory")


def load_policy(model_name_or_path: str, seed: int = 0) -> tuple:
    """(causal LM, tokenizer): ``"embedded"`` builds the tiny offline pair (initialised by ``seed``), anything else
    is a hub id or a ``save_pretrained`` directory (a path that does not exist is a ValueError, never a download)."""
    if model_name_or_path == EMBEDDED:
        tokenizer = build_tiny_tokenizer()
        return build_tiny_policy(tokenizer, seed=seed), tokenizer
    refuse_reward_model(model_name_or_path)
    path = local_path_or_hub_id(model_name_or_path, "model directory", MODEL_CONFIG_NAME)
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


def load_reward_model(path: str, fallback_tokenizer) -> tuple:
    """(DistRewardForSequenceClassification in eval mode, its tokenizer: the one saved beside it, else
    ``fallback_tokenizer``) from an rm stage's output directory, in the current or the legacy format."""
    kind = reward_model_format(path)
    if kind is None:
        if os.path.isfile(os.path.join(path, GENERATION_CONFIG_NAME)) or os.path.isfile(
                os.path.join(path, SFT_CONFIG_NAME)):
            raise ValueError(f"{path} holds a policy (a causal LM), not a reward model: give the rm stage's output "
                             f"directory as --reward_model_path")
        raise ValueError(f"no reward model in {path}: run `python -m distreward.train rm` first or set "
                         f"--reward_model_path")
    has_tokenizer = os.path.isfile(os.path.join(path, TOKENIZER_CONFIG_NAME))
    tokenizer = load_tokenizer(path) if has_tokenizer else fallback_tokenizer
    if kind == "legacy":
        return load_legacy_reward_model(path), tokenizer
    return DistRewardForSequenceClassification.from_pretrained(path), tokenizer


def load_policy_and_reference(path: str):
    """(policy, frozen reference copy, tokenizer) from an SFT output directory."""
    refuse_reward_model(path)
    if not os.path.isfile(os.path.join(path, MODEL_CONFIG_NAME)):
        raise ValueError(f"no policy in {path}: run `python -m distreward.train sft` first or set --policy_path")
    policy, tokenizer = load_policy(path)
    return policy, copy.deepcopy(policy), tokenizer
