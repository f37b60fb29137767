"""Per-token log-probs of sampled responses under a causal LM, without its full ``[B, T, V]`` logits.

REINFORCE needs ``log pi(y_t)`` of every response token for the policy (with gradients) and the
frozen reference (docs/math.md §4-5). :func:`sequence_logprobs` runs the model's trunk once, keeps the
hidden states of the positions that predict a response token, and applies the LM head and the
fused gather ``chunk_size`` positions per row at a time, so at most one chunk of logits exists at
any moment. For a plain ``nn.Linear`` head and a fused backend (C++ on CPU, Triton on CUDA: the
``backend`` argument, resolved as ``ops.gather_logprobs`` does), :class:`LinearGatherLogprobs` fuses head
and gather: it keeps only the chunk's hidden states and logsumexp for backward, recomputes the
logits there and turns them into their own gradient in place (as Liger-Kernel's fused linear
cross-entropy does). Other heads (logit soft-capping, custom modules) go through
:func:`distreward.ops.gather_logprobs` under activation checkpointing.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distreward import ops
from distreward.ops import registry
from distreward.ops.validation import check_positive, first_position, validating
from distreward.shared_prefix import trunk_hidden_states


def _check_inputs(model, input_ids, attention_mask, response_mask, chunk_size, group_size) -> None:
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a causal LM with an output embedding (LM head), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int64 (or int32) tensor [B, T], got {getattr(input_ids, 'dtype', '')} "
                         f"{getattr(input_ids, 'shape', input_ids)!r}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}")
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {getattr(mask, 'shape', mask)!r}")
        if mask.device != input_ids.device:
            raise ValueError(f"{name} is on {mask.device} but input_ids are on {input_ids.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or (
            input_ids.shape[0] % group_size):
        raise ValueError(f"group_size must be a positive integer that divides the batch of {input_ids.shape[0]} "
                         f"rows, got {group_size!r}")


def _check_values(model, input_ids, attention_mask, response_mask) -> None:
    """No NaN in a float mask (ValueError); every input id in the model's embedding table [0, num_embeddings)
    (IndexError naming the first). Host reads: only when the call validates."""
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if mask.is_floating_point() and bool(torch.isnan(mask).any()):
            raise ValueError(f"{name} contains NaN")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is not None and input_ids.numel():
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bool(bad.any()):
            b, t = first_position(bad)
            raise IndexError(f"input_ids[{b}, {t}] = {int(input_ids[b, t])} is outside the model's vocabulary [0, {vocab})")


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        group_size: int = 1) -> torch.Tensor:
    """The hidden states [B, T, H] that ``model``'s LM head reads: from its base model (``model.model``,
    ``model.transformer``, ...), each group's shared prefix run once (:mod:`distreward.shared_prefix`), or from a
    full forward's ``output_hidden_states`` if it has none."""
    trunk = model.base_model
    if trunk is not model:
        return trunk_hidden_states(trunk, input_ids, attention_mask, group_size)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                 output_hidden_states=True).hidden_states[-1]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for ``hidden`` [..., H]: its output embedding, then the final logit
    soft-capping of models that have one (Gemma 2 / 3 ``config.final_logit_softcapping``)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


class LinearGatherLogprobs(torch.autograd.Function):
    """hidden [n, H], weight [V, H], bias [V] or None, ids [n] -> log softmax(hidden @ weight.T + bias)[ids] [n]
    fp32 (fp64). Saves hidden and the logsumexp [n], not the [n, V] logits: backward recomputes them and
    overwrites them with their gradient before the two matmuls into hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, kernels):
        """``kernels``: the fused gather's module (``gather_logprobs_forward`` / ``gather_logprobs_backward``)."""
        logits = F.linear(hidden, weight, bias).unsqueeze(0)
        logp, lse = kernels.gather_logprobs_forward(logits, ids.unsqueeze(0), None)  # every row live
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.kernels = kernels
        return logp.squeeze(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        logits = F.linear(hidden, weight, bias).unsqueeze(0)
        grad_logits = ctx.kernels.gather_logprobs_backward(grad_logp.unsqueeze(0), logits, ids.unsqueeze(0), None, lse,
                                      in_place=True).squeeze(0)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (grad_logits @ weight if needs_hidden else None,
                grad_logits.T @ hidden if needs_weight else None,
                grad_logits.sum(0) if bias is not None and needs_bias else None, None, None)


def chunk_logprobs_function(model, backend: str, temperature: float = 1.0, validate: bool = False):
    """``f(hidden [n, H], ids [n]) -> log-probs [n]`` of ``softmax(head(hidden) / temperature)`` for one chunk of
    ``model``'s head and a resolved gather ``backend``: head and gather fused for a plain ``nn.Linear`` head and a
    fused backend (``hidden`` and the bias divided by ``temperature``), else the head, soft-capping, the division
    and ``ops.gather_logprobs`` (with ``validate``) checkpointed. No host sync per chunk unless ``validate``."""
    head = model.get_output_embeddings()
    plain = type(head) is torch.nn.Linear and getattr(model.config, "final_logit_softcapping", None) is None

    def tempered(tensor):  # no copy at the default temperature
        return tensor if temperature == 1.0 or tensor is None else tensor / temperature

    if plain and registry.is_fused(backend):
        kernels = registry.kernels("gather_logprobs", backend)
        return lambda hidden, ids: LinearGatherLogprobs.apply(tempered(hidden), head.weight, tempered(head.bias), ids,
                                                              kernels)

    def checkpointed(hidden, ids):
        def logprobs(chunk_hidden, chunk_ids):
            logits = tempered(head_logits(model, chunk_hidden).unsqueeze(0))  # [1, n, V]
            return ops.gather_logprobs(logits, chunk_ids.unsqueeze(0), backend=backend, validate=validate).squeeze(0)

        return checkpoint(logprobs, hidden, ids, use_reentrant=False) if torch.is_grad_enabled() else logprobs(hidden, ids)

    return checkpointed


def check_targets(targets: torch.Tensor, vocab) -> None:
    """Response token ids [N] in the head's vocabulary [0, vocab) (vocab None: the gather checks them)."""
    if vocab is None or not targets.numel():
        return
    if bool(((targets < 0) | (targets >= vocab)).any()):
        raise IndexError(f"input_ids hold response tokens outside the head's vocabulary [0, {vocab})")


def check_finite(logprobs: torch.Tensor) -> None:
    """The log-probs [N] are finite: a NaN or inf in the model's logits (or hidden states) raises ValueError."""
    if not bool(torch.isfinite(logprobs).all()):
        raise ValueError("the model's log-probs of some response tokens are NaN or inf (NaN or inf in its logits)")


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      chunk_size: int = 256, backend: str = "auto", temperature: float = 1.0,
                      validate=None, group_size: int = 1) -> torch.Tensor:
    """Per-token log-probs of ``input_ids`` under ``model``, on the response tokens only.

    Args:
        model: a ``transformers`` causal LM (anything with ``get_output_embeddings()``).
        input_ids: [B, T] prompt + response token ids (int64).
        attention_mask: [B, T], 1 on real tokens, 0 on padding (left or right).
        response_mask: [B, T], true on the response tokens to score.
        chunk_size: positions per row whose logits are computed at once: peak extra memory is about
            ``B * chunk_size * V`` logits instead of ``B * T * V`` (twice that in backward for the
            checkpointed path).
        backend: the gather's backend, resolved as :func:`distreward.ops.gather_logprobs` does ("auto",
            "eager", "triton" or "cpp").
        temperature: the log-probs of ``softmax(logits / temperature)``, the distribution that ``generate``
            samples at that temperature (TRL's GRPO trainer scores its samples the same way); > 0.
        validate: check the ids against the vocabulary and the log-probs for NaN / inf at once, raising
            IndexError / ValueError (host syncs); None, the default, on CPU only (:mod:`distreward.ops`).
            Without, a NaN in the model's logits gives NaN log-probs (bad ids fail in the embedding).
        group_size: the rows come in groups of this many adjacent rows that share their leading tokens (several
            samples of one prompt): the trunk runs each group's common prefix once (one host read to find it;
            :mod:`distreward.shared_prefix`). Any grouping gives the same log-probs; 1 (the default) runs every
            row whole.

    Returns:
        [B, T] float32 (float64 for a float64 model): ``out[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])``
        where ``response_mask[b, t]`` is true and t >= 1, else 0. Differentiable w.r.t. the model's parameters.
    """
    _check_inputs(model, input_ids, attention_mask, response_mask, chunk_size, group_size)
    check_positive("temperature", temperature)
    backend = registry.resolve("gather_logprobs", backend, input_ids.device)
    checking = validating(validate, input_ids.device)
    if checking:
        _check_values(model, input_ids, attention_mask, response_mask)
    batch, steps = input_ids.shape
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    if input_ids.numel() == 0:
        return torch.zeros(batch, steps, dtype=dtype, device=input_ids.device)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)
    scored[:, 1:] = response_mask[:, 1:].bool()
    targets = input_ids[scored].long()  # [N]
    if checking:
        check_targets(targets, getattr(model.get_output_embeddings(), "out_features", None))
    hidden = final_hidden_states(model, input_ids, attention_mask, group_size)
    # Position t - 1 predicts token t: keep only the hidden states that predict a scored token.
    predictors = hidden[:, :-1][scored[:, 1:]]  # [N, H]

    chunk_logprobs = chunk_logprobs_function(model, backend, float(temperature), checking)
    rows = batch * chunk_size
    pieces = [chunk_logprobs(predictors[start:start + rows], targets[start:start + rows])
              for start in range(0, predictors.shape[0], rows)]
    logprobs = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=dtype)
    if checking:
        check_finite(logprobs)
    return torch.zeros(batch, steps, dtype=dtype, device=hidden.device).masked_scatter(scored, logprobs)
