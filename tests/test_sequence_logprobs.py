"""``distreward.sequence_logprobs`` against the log-probs and parameter gradients of a full forward
pass of tiny offline models (Llama, GPT-2 with tied embeddings, Gemma 2 with logit soft-capping),
with left padding, ragged response masks and chunks smaller than, equal to and larger than T."""
import pytest
import torch
from devices import INTERPRETED, TRITON_DEVICE
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import distreward
from distreward import sequence_logprobs

VOCAB = 512


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(dtype).eval()  # eval: no dropout, so two passes agree


def tiny_llama_with_head_bias():
    model = tiny_llama()
    model.lm_head = torch.nn.Linear(64, VOCAB, bias=True)
    return model


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=2.0, pad_token_id=0)
    return Gemma2ForCausalLM(config).eval()


def rollout_batch(batch=3, steps=37, seed=1):
    """Left-padded prompts followed by responses of different lengths (right padding after them)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, steps), generator=g)
    attention_mask = torch.ones(batch, steps, dtype=torch.long)
    response_mask = torch.zeros(batch, steps, dtype=torch.bool)
    for b in range(batch):
        pad, prompt_end, response_end = 2 * b, 10 + b, steps - 3 * b
        attention_mask[b, :pad] = 0
        attention_mask[b, response_end:] = 0
        response_mask[b, prompt_end:response_end] = True
    return input_ids, attention_mask, response_mask


def full_forward_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0):
    """The materialised path: all [B, T, V] logits, divided by the temperature, log_softmax, gather, mask."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(input_ids.shape, device=input_ids.device)
    out[:, 1:] = picked * response_mask[:, 1:]
    return out


def parameter_grads(model, logprobs, upstream):
    model.zero_grad()
    (logprobs * upstream).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_llama, tiny_llama_with_head_bias, tiny_gpt2, tiny_gemma2])
@pytest.mark.parametrize("chunk_size, backend", [(5, "auto"), (64, "cpp"), (5, "eager"), (64, "triton")])
def test_matches_a_full_forward_pass(build, chunk_size, backend):
    check_against_a_full_forward_pass(build, chunk_size, backend)


@pytest.mark.parametrize("build", [tiny_llama_with_head_bias, tiny_gemma2], ids=["fused_linear", "checkpointed"])
@pytest.mark.parametrize("backend", ["cpp", "eager", "triton"])
@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_a_temperature_divides_the_logits(build, backend, temperature):
    check_against_a_full_forward_pass(build, 5, backend, temperature)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_a_frozen_head_gets_no_gradient_and_the_trunk_the_full_passes(backend):
    """The head frozen (as under LoRA): the fused backward skips the weight's GEMM; the trunk's gradients are the
    materialised path's."""
    model = tiny_llama_with_head_bias()
    model.lm_head.requires_grad_(False)
    batch = rollout_batch()
    upstream = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(2))
    expected = parameter_grads(model, full_forward_logprobs(model, *batch), upstream)
    actual = parameter_grads(model, sequence_logprobs(model, *batch, chunk_size=5, backend=backend), upstream)
    assert model.lm_head.weight.grad is None and not any(name.startswith("lm_head") for name in actual)
    assert actual.keys() == expected.keys() and len(actual) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()) + 1e-12, msg=name)


def check_against_a_full_forward_pass(build, chunk_size, backend, temperature=1.0):
    """Values and parameter gradients of sequence_logprobs against the materialised path."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if device == "cpu" and backend == "triton" and not INTERPRETED:  # Triton runs on CUDA, or anywhere interpreted
        pytest.skip("backend='triton' needs CUDA or TRITON_INTERPRET=1")
    model = build().to(device)
    batch = tuple(tensor.to(device) for tensor in rollout_batch())
    upstream = torch.randn(batch[0].shape, generator=torch.Generator().manual_seed(2)).to(device)
    expected = full_forward_logprobs(model, *batch, temperature=temperature)
    expected_grads = parameter_grads(model, expected, upstream)
    actual = sequence_logprobs(model, *batch, chunk_size=chunk_size, backend=backend, temperature=temperature)
    assert actual.shape == batch[0].shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert bool((actual[~batch[2]] == 0).all()) and bool((actual[:, 0] == 0).all())
    actual_grads = parameter_grads(model, actual, upstream)
    assert actual_grads.keys() == expected_grads.keys() and len(actual_grads) > 0
    for name, grad in expected_grads.items():  # fp32 sums in another order: tolerance relative to the largest entry
        atol = 1e-5 * float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


def test_no_grad_reference_and_bfloat16_model():
    batch = rollout_batch(seed=4)
    model = tiny_llama(torch.bfloat16)
    with torch.no_grad():
        expected = full_forward_logprobs(model, *batch)
        actual = sequence_logprobs(model, *batch, chunk_size=8)
    assert actual.dtype == torch.float32 and not actual.requires_grad
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma2], ids=["fused_linear", "checkpointed"])
def test_logits_exist_one_chunk_of_response_positions_at_a_time(build, monkeypatch):
    model = build()
    input_ids, attention_mask, response_mask = rollout_batch()
    linear, rows_seen = torch.nn.functional.linear, []

    def recording_linear(*args):
        out = linear(*args)
        if out.shape[-1] == VOCAB:
            rows_seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=4).sum().backward()
    assert max(rows_seen) == 3 * 4  # B * chunk_size rows of logits at a time
    assert sum(rows_seen) == 2 * int(response_mask[:, 1:].sum())  # forward + recompute in backward, scored rows only


def test_falls_back_to_output_hidden_states_without_a_base_model():
    model = tiny_llama()
    model.base_model_prefix = "absent"  # model.base_model is then the model itself
    assert model.base_model is model
    batch = rollout_batch(seed=5)
    torch.testing.assert_close(sequence_logprobs(model, *batch, chunk_size=7), full_forward_logprobs(model, *batch),
                               rtol=1e-5, atol=1e-5)


def test_nothing_to_score_gives_zeros():
    input_ids, attention_mask, response_mask = rollout_batch()
    out = sequence_logprobs(tiny_llama(), input_ids, attention_mask, torch.zeros_like(response_mask))
    assert out.shape == input_ids.shape and bool((out == 0).all())


def test_exported_at_package_level():
    assert distreward.sequence_logprobs is sequence_logprobs and "sequence_logprobs" in distreward.__all__


def test_bad_input_raises_value_error():
    model = tiny_llama()
    input_ids, attention_mask, response_mask = rollout_batch(batch=2, steps=9)
    bad_calls = {
        "model must be": (torch.nn.Linear(2, 2), input_ids, attention_mask, response_mask, 4),
        "input_ids must be": (model, input_ids.float(), attention_mask, response_mask, 4),
        "attention_mask must be": (model, input_ids, attention_mask[:, :3], response_mask, 4),
        "response_mask must be": (model, input_ids, attention_mask, None, 4),
        "chunk_size must be": (model, input_ids, attention_mask, response_mask, 0),
    }
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            sequence_logprobs(*args[:4], chunk_size=args[4])
    for temperature in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="temperature must be"):
            sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature=temperature)
    input_ids[1, 5] = VOCAB
    with pytest.raises((IndexError, ValueError)):
        sequence_logprobs(model, input_ids, attention_mask, torch.ones_like(response_mask))


def test_backend_is_resolved_like_ops_gather_logprobs(monkeypatch):
    """sequence_logprobs uses the gather's dispatch table: the fused pair of the backend asked for, the
    checkpointed ops.gather_logprobs with that backend otherwise, and the same errors."""
    from distreward.ops import registry

    asked, kernels = [], registry.kernels
    monkeypatch.setattr(registry, "kernels", lambda op, backend: asked.append((op, backend)) or kernels(op, backend))
    batch = rollout_batch()
    sequence_logprobs(tiny_llama(), *batch, backend="cpp")
    assert asked == [("gather_logprobs", "cpp")]
    with pytest.raises(ValueError, match="backend must be one of"):
        sequence_logprobs(tiny_llama(), *batch, backend="fast")


def test_nan_in_the_model_raises_value_error():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    for backend in ("eager", "cpp"):
        with pytest.raises(ValueError, match="NaN"):
            sequence_logprobs(model, *rollout_batch(), backend=backend)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_int32_input_ids(backend):
    """int32 ids reach the fused kernels as int64 (found by tests/test_fuzz_gather.py)."""
    model, batch = tiny_llama(), rollout_batch(seed=6)
    expected = sequence_logprobs(model, *batch, backend=backend)
    torch.testing.assert_close(sequence_logprobs(model, batch[0].int(), *batch[1:], backend=backend), expected)
