"""Forward passes over groups of rows that share a prefix: the prefix runs once per group.

REINFORCE samples several responses per prompt (docs/math.md §5), so a rollout's rows come in groups of
``group_size`` adjacent rows whose leading tokens (the chat-templated prompt) are the same. Running the
transformer over each row repeats the prompt's work ``group_size`` times. Here the trunk runs once over each
group's common prefix with a key/value cache, the cache is repeated to every row of its group, and the trunk
runs over each row's remaining columns, at the positions they hold in the row. Each row's hidden states are those
of the plain forward (the same math, up to float rounding), with gradients through both passes.

It needs a ``transformers`` trunk that takes a cache (``cache`` or ``past_key_values``) and ``position_ids``;
for anything else (a PEFT wrapper, a custom module, activation checkpointing that turns the cache off) it runs
the plain forward.
"""
import inspect

import torch


def cache_argument(module):
    """The name under which ``module.forward`` takes a key/value cache (``"cache"`` in transformers >= 5.24,
    ``"past_key_values"`` before), or None when it takes none or no ``position_ids``."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def new_cache(config=None):
    """An empty ``transformers.DynamicCache``, laid out for ``config``'s layers (sliding windows) where the installed
    transformers takes a config."""
    from transformers import DynamicCache

    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


def prefill(trunk, cache_name: str, input_ids, attention_mask, position_ids, repeats: int):
    """Run ``trunk`` over [G, L] rows with a fresh cache -> (last hidden state [G, L, H], the cache with each row
    repeated ``repeats`` times, or None when the trunk kept no cache: activation checkpointing in training)."""
    cache = new_cache(getattr(trunk, "config", None))
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **{cache_name: cache}).last_hidden_state
    if cache.get_seq_length() != input_ids.shape[1]:
        return hidden, None
    cache.batch_repeat_interleave(repeats)
    return hidden, cache


def common_prefix_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int) -> list:
    """input_ids, attention_mask [B, T] with B a multiple of ``group_size`` -> per group of adjacent rows, the number
    of leading columns in which all its rows agree (ids and mask), at most T - 1. One host read."""
    batch, steps = input_ids.shape
    if batch % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch of {batch} rows")
    ids, mask = input_ids.view(-1, group_size, steps), attention_mask.view(-1, group_size, steps)
    same = ((ids == ids[:, :1]) & (mask == mask[:, :1])).all(1)  # [G, T]
    return same.long().cumprod(1).sum(1).clamp(max=steps - 1).tolist()


def trunk_hidden_states(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int = 1):
    """``trunk(input_ids, attention_mask).last_hidden_state`` [B, T, H], each group's common prefix run once.

    Positions are the columns' (0..T-1, as the trunk's own default), so left or right padding reads as it does in
    the plain forward. ``group_size`` 1, or a trunk that takes no cache: the plain forward.
    """
    def whole_rows():
        return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    cache_name = cache_argument(trunk)
    if group_size == 1 or cache_name is None or input_ids.shape[1] < 2:
        return whole_rows()
    lengths = common_prefix_lengths(input_ids, attention_mask, group_size)
    batch, steps = input_ids.shape
    device = input_ids.device
    prefix_width = max(lengths)
    if prefix_width == 0:  # no group shares even its first column
        return whole_rows()
    prefix_length = torch.tensor(lengths, device=device).repeat_interleave(group_size)  # [B]
    columns = torch.arange(steps, device=device)
    # The prefix pass: each group's first row, its columns past the group's common prefix masked out.
    first_rows = slice(None, None, group_size)
    prefix_mask = attention_mask[first_rows, :prefix_width] * (columns[:prefix_width] < prefix_length[first_rows, None])
    prefix, cache = prefill(trunk, cache_name, input_ids[first_rows, :prefix_width], prefix_mask,
                            columns[:prefix_width].expand(len(lengths), -1), group_size)  # [G, Lp, H]
    if cache is None:
        return whole_rows()
    # The suffix pass: row b's columns from its group's prefix length on, left-aligned; columns past T masked out.
    suffix_width = steps - min(lengths)
    suffix_columns = prefix_length[:, None] + columns[:suffix_width]  # [B, Ls]
    inside = suffix_columns < steps
    suffix_columns = suffix_columns.clamp(max=steps - 1)
    suffix_mask = attention_mask.gather(1, suffix_columns) * inside
    suffix = trunk(input_ids=input_ids.gather(1, suffix_columns), position_ids=suffix_columns, use_cache=True,
                   attention_mask=torch.cat([prefix_mask.repeat_interleave(group_size, 0), suffix_mask], 1),
                   **{cache_name: cache}).last_hidden_state  # [B, Ls, H]
    # Row b's column t: the prefix's hidden state below the prefix length, the suffix's from it on.
    in_prefix = columns < prefix_length[:, None]  # [B, T]
    from_prefix = prefix.repeat_interleave(group_size, 0).gather(
        1, columns.clamp(max=prefix_width - 1).expand(batch, -1)[..., None].expand(-1, -1, prefix.shape[-1]))
    suffix_index = (columns - prefix_length[:, None]).clamp(0, suffix_width - 1)
    from_suffix = suffix.gather(1, suffix_index[..., None].expand(-1, -1, suffix.shape[-1]))
    return torch.where(in_prefix[..., None], from_prefix, from_suffix)
