"""The distributional reward model as a Hugging Face model (docs/math.md §1), in one file that imports only torch
and transformers: ``save_pretrained`` copies it beside the weights, so that

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

loads a saved model where distreward is not installed (docs/integrations.md).

:class:`DistRewardForSequenceClassification` is a causal-LM body and ``nn.Linear(hidden_size, K)`` on the hidden
state of each row's last real token (read from the attention mask). ``softmax(bin_logits)`` is a distribution over
the K bin centers ``linspace(low, high, K)``; its mean E is the reward and its std the uncertainty. The output's
``logits`` [B, 1] is E, the single score reward-bench and TRL read from a sequence classifier. With
``head="scalar"`` (the scalar reward-model baseline) the head has one output, which is the reward itself.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

HEADS = ("distribution", "scalar")


class DistRewardConfig(PretrainedConfig):
    """A backbone's config (``backbone_config``, a causal LM's: Llama, SmolLM2, ...) and the head: ``num_bins``
    K, the bin range [``low``, ``high``] and ``head`` (``distribution`` or ``scalar``)."""

    model_type = "distreward"

    def __init__(self, backbone_config=None, num_bins: int = 10, low: float = 0.0, high: float = 1.0,
                 head: str = "distribution", **kwargs):
        if isinstance(backbone_config, dict):
            settings = dict(backbone_config)
            backbone_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if not float(low) < float(high):
            raise ValueError(f"low must be below high, got low={low}, high={high}")
        self.backbone_config = backbone_config
        self.num_bins, self.low, self.high, self.head = num_bins, float(low), float(high), head
        kwargs.setdefault("num_labels", 1)  # one score per sequence: TRL and reward-bench read logits [B, 1]
        super().__init__(**kwargs)


@dataclass
class RewardOutput(ModelOutput):
    """``logits`` [B, 1] fp32: the reward (the mean E; a scalar head's value). ``bin_logits`` [B, K] fp32: the
    head's raw output (a scalar head: [B, 1]). ``mean`` and ``std`` [B] fp32 of ``softmax(bin_logits)`` over the
    bin centers (a scalar head: its value and zeros)."""

    logits: Optional[torch.Tensor] = None
    bin_logits: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None


def softmax_moments(logits: torch.Tensor, centers: torch.Tensor) -> tuple:
    """logits [B, K], centers [K] -> (mean [B], std [B]) fp32 of softmax(logits) over the centers."""
    probs = torch.softmax(logits.float(), dim=-1)
    centers = centers.float()
    mean = (probs * centers).sum(-1)
    variance = (probs * (centers - mean.unsqueeze(-1)).square()).sum(-1)
    return mean, variance.clamp_min(0).sqrt()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] -> index [B] of each row's last real token (right or left padding).

    Read from the mask, never from the first pad id: SmolLM2's pad token is its EOS.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    if not bool(attention_mask.bool().any(-1).all()):
        raise ValueError("attention_mask has a row with no real token")
    return (positions * attention_mask.bool()).argmax(-1)


class DistRewardForSequenceClassification(PreTrainedModel):
    """``forward(input_ids [B, T], attention_mask [B, T]) -> RewardOutput`` (see the module doc).

    The bin centers are computed from the config, never stored, so no loading path can leave them uninitialised.
    """

    config_class = DistRewardConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # (logits [B, K] fp32, centers [K]) -> (mean [B], std [B]) fp32; distreward puts its fused ops.dist_moments here
    moments = staticmethod(softmax_moments)

    def __init__(self, config: DistRewardConfig, backbone: Optional[PreTrainedModel] = None):
        """``backbone``: a loaded transformer body to use (its config must be ``config.backbone_config``); None
        builds one from ``config.backbone_config``."""
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("DistRewardConfig has no backbone_config (the config of the transformer body)")
        self.backbone = AutoModel.from_config(config.backbone_config) if backbone is None else backbone
        self.head = nn.Linear(config.backbone_config.hidden_size, 1 if self.is_scalar else config.num_bins)
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone_or_path, num_bins: int = 10, low: float = 0.0, high: float = 1.0,
                      head: str = "distribution", dtype: Optional[torch.dtype] = None):
        """A fresh head on a backbone: a loaded causal LM (its body is used, its LM head dropped) or transformer
        body, or a hub id / local directory of one."""
        if not isinstance(backbone_or_path, PreTrainedModel):
            backbone_or_path = AutoModel.from_pretrained(backbone_or_path, dtype=dtype)
        backbone = backbone_or_path.base_model
        config = DistRewardConfig(backbone_config=backbone.config, num_bins=num_bins, low=low, high=high, head=head)
        return cls(config, backbone=backbone)

    def _init_weights(self, module: nn.Module) -> None:
        """Only the head: the backbone initialises itself (or is loaded)."""
        if module is self.head:
            nn.init.normal_(module.weight, std=1.0 / (module.in_features + 1) ** 0.5)
            nn.init.zeros_(module.bias)

    @property
    def is_scalar(self) -> bool:
        """Whether the head is the scalar baseline (one output, no distribution)."""
        return self.config.head == "scalar"

    @property
    def num_bins(self) -> int:
        return self.config.num_bins

    @property
    def low(self) -> float:
        return self.config.low

    @property
    def high(self) -> float:
        return self.config.high

    @property
    def centers(self) -> Optional[torch.Tensor]:
        """Bin centers ``linspace(low, high, num_bins)`` [K] fp32 on the head's device (None for a scalar head)."""
        if self.is_scalar:
            return None
        return torch.linspace(self.config.low, self.config.high, self.config.num_bins, dtype=torch.float32,
                              device=self.head.weight.device)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs):
        """input_ids [B, T] (or ``inputs_embeds`` [B, T, H] in ``kwargs``), attention_mask [B, T] (None: no
        padding) -> :class:`RewardOutput` (a tuple of its fields with ``return_dict=False``). ``kwargs`` go to the
        backbone."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        output = self.reward_from_hidden(hidden, attention_mask)
        return output.to_tuple() if return_dict is False else output

    def reward_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> RewardOutput:
        """The head on the backbone's hidden states [B, T, H] at each row's last real token (attention_mask
        [B, T]) -> :class:`RewardOutput`."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last_hidden = hidden[rows, last_token_index(attention_mask.to(hidden.device))]  # [B, H]
        bin_logits = self.head(last_hidden.to(self.head.weight.dtype)).float()
        if self.is_scalar:
            mean, std = bin_logits[:, 0], torch.zeros_like(bin_logits[:, 0])
        else:
            mean, std = self.moments(bin_logits, self.centers)
        return RewardOutput(logits=mean.unsqueeze(-1), bin_logits=bin_logits, mean=mean, std=std)


DistRewardConfig.register_for_auto_class()
DistRewardForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
