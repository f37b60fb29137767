"""The models: :func:`load_policy` loads a causal LM and its tokenizer, and the distributional reward model of
docs/math.md §1 is a causal-LM backbone and a K-bin softmax head (or, as a baseline, a scalar head).

Saved by :meth:`DistributionalRewardModel.save_pretrained` as ``model.safetensors`` (backbone and
head weights) and ``reward_model_config.json`` (head settings and the backbone's config), so the
``config.json`` of a run directory stays the run's own settings; the trainer saves the tokenizer
beside them.
"""
import copy
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from distreward import ops
from distreward.data import EMBEDDED, local_path_or_hub_id
from distreward.ops.validation import check_choice
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "reward_model_config.json"


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id or directory; one without a pad token pads with its EOS (as SmolLM2 needs)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refuse_reward_model(path: str) -> None:
    """ValueError when ``path`` is a reward model's directory where a policy (a causal LM) is expected."""
    if os.path.isfile(os.path.join(os.path.expanduser(path), CONFIG_NAME)):
        raise ValueError(f"{path} holds a reward model ({CONFIG_NAME}), not a policy: give the sft stage's output "
                         f"directory")


def load_policy(model_name_or_path: str, seed: int = 0) -> tuple:
    """(causal LM, tokenizer): ``"embedded"`` builds the tiny offline pair (initialised by ``seed``), anything else
    is a hub id or a ``save_pretrained`` directory (a path that does not exist is a ValueError, never a download)."""
    if model_name_or_path == EMBEDDED:
        tokenizer = build_tiny_tokenizer()
        return build_tiny_policy(tokenizer, seed=seed), tokenizer
    refuse_reward_model(model_name_or_path)
    path = local_path_or_hub_id(model_name_or_path, "model directory", "config.json")
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


@dataclass
class RewardOutput(ModelOutput):
    """``logits`` [B, K] fp32, and the distribution's ``mean`` (the reward E) and ``std`` [B] fp32
    (a scalar head: ``logits`` [B, 1], ``mean`` its value, ``std`` zeros)."""

    logits: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] -> index [B] of each row's last real token (right or left padding).

    Read from the mask, never from the first pad id: SmolLM2's pad token is its EOS.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    if not bool(attention_mask.bool().any(-1).all()):
        raise ValueError("attention_mask has a row with no real token")
    return (positions * attention_mask.bool()).argmax(-1)


def base_model_of(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer body of a causal LM (``model.model`` for Llama); the model itself otherwise."""
    return model.base_model if isinstance(model, PreTrainedModel) else model


HEADS = ("distribution", "scalar")


class DistributionalRewardModel(nn.Module):
    """Backbone + ``nn.Linear(hidden_size, num_bins)`` on the hidden state of the last real token.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> RewardOutput`` with the K-bin logits and
    the mean / std of ``softmax(logits)`` over ``bin_centers(num_bins, low, high)``. With
    ``head="scalar"`` (the scalar reward-model baseline) the head is ``nn.Linear(hidden_size, 1)``, its
    output the reward itself, and ``centers`` is None.
    """

    def __init__(self, backbone: PreTrainedModel, num_bins: int = 10, low: float = 0.0, high: float = 1.0,
                 moments_backend: str = "auto", head: str = "distribution"):
        super().__init__()
        check_choice("head", head, HEADS)
        self.backbone = base_model_of(backbone)
        self.num_bins, self.low, self.high, self.head_kind = num_bins, float(low), float(high), head
        self.moments_backend = moments_backend
        centers = None if self.is_scalar else ops.bin_centers(num_bins, low, high)
        self.head = nn.Linear(self.backbone.config.hidden_size, 1 if self.is_scalar else num_bins)
        nn.init.normal_(self.head.weight, std=1.0 / (self.backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("centers", centers, persistent=False)

    @property
    def is_scalar(self) -> bool:
        """Whether the head is the scalar baseline (one output, no distribution)."""
        return self.head_kind == "scalar"

    @classmethod
    def from_backbone(cls, backbone_or_path, num_bins: int = 10, low: float = 0.0, high: float = 1.0,
                      torch_dtype: Optional[torch.dtype] = None, **kwargs) -> "DistributionalRewardModel":
        """A fresh head on a backbone: a loaded model, or a hub id / local directory of a causal LM."""
        if isinstance(backbone_or_path, (str, os.PathLike)):
            backbone_or_path = AutoModel.from_pretrained(backbone_or_path, dtype=torch_dtype)
        return cls(backbone_or_path, num_bins=num_bins, low=low, high=high, **kwargs)

    @property
    def config(self):
        """The backbone's config (``hidden_size``, ``pad_token_id``, ...)."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> RewardOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last_hidden = hidden[rows, last_token_index(attention_mask)]  # [B, H]
        logits = self.head(last_hidden.to(self.head.weight.dtype)).float()
        if self.is_scalar:
            return RewardOutput(logits=logits, mean=logits[:, 0], std=torch.zeros_like(logits[:, 0]))
        mean, std = ops.dist_moments(logits, self.centers.to(logits.device), backend=self.moments_backend)
        return RewardOutput(logits=logits, mean=mean, std=std)

    def head_config(self) -> dict:
        return {"num_bins": self.num_bins, "low": self.low, "high": self.high, "head": self.head_kind,
                "backbone_config": self.backbone.config.to_dict()}

    def save_pretrained(self, save_directory) -> None:
        """Write ``model.safetensors`` and ``reward_model_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as handle:
            json.dump(self.head_config(), handle, indent=2)

    @classmethod
    def from_pretrained(cls, directory, torch_dtype: Optional[torch.dtype] = None,
                        **kwargs) -> "DistributionalRewardModel":
        """Load a model written by :meth:`save_pretrained` (``kwargs``: e.g. ``moments_backend``), in eval mode
        (dropout off) as transformers' ``from_pretrained`` returns it: call ``.train()`` to fine-tune it."""
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"{directory} holds no {CONFIG_NAME}: not a saved DistributionalRewardModel")
        with open(config_path) as handle:
            settings = json.load(handle)
        backbone_settings = dict(settings.pop("backbone_config"))
        backbone_config = AutoConfig.for_model(backbone_settings.pop("model_type"), **backbone_settings)
        model = cls(AutoModel.from_config(backbone_config), **settings, **kwargs)
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
        model.eval()
        return model.to(torch_dtype) if torch_dtype is not None else model


def load_reward_model(path: str, fallback_tokenizer):
    """(DistributionalRewardModel, its tokenizer: the one saved beside it, else ``fallback_tokenizer``)."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(path, "generation_config.json")) or os.path.isfile(
                os.path.join(path, "sft_config.json")):
            raise ValueError(f"{path} holds a policy (a causal LM), not a reward model: give the rm stage's output "
                             f"directory as --reward_model_path")
        raise ValueError(f"no reward model in {path}: run `python -m distreward.train rm` first or set "
                         f"--reward_model_path")
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    tokenizer = load_tokenizer(path) if has_tokenizer else fallback_tokenizer
    return DistributionalRewardModel.from_pretrained(path), tokenizer


def load_policy_and_reference(path: str):
    """(policy, frozen reference copy, tokenizer) from an SFT output directory."""
    refuse_reward_model(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"no policy in {path}: run `python -m distreward.train sft` first or set --policy_path")
    policy, tokenizer = load_policy(path)
    return policy, copy.deepcopy(policy), tokenizer
