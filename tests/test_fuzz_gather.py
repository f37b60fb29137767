"""Fuzzing the log-prob gathers: ``ops.gather_logprobs`` with every backend, ``sequence_logprobs``, and
the C++ ops called directly through ``torch.ops.distreward`` (in a subprocess, so a crash is reported
instead of killing pytest).

Random shapes (empty ones included), layouts, dtypes, NaN / inf, out-of-range ids, wrong ranks and
wrong devices ("meta" tensors stand in for another device). An independent oracle says for each case
whether the inputs are valid: valid inputs must give the float64 reference's values (and gradients),
invalid ones a ValueError / IndexError: never a crash, a RuntimeError or a silently wrong number.
A short deterministic sample runs by default; ``DISTREWARD_FUZZ_EXAMPLES=10000`` runs that many cases
per op.
"""
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("DISTREWARD_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2**-23, torch.float64: 2**-52, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@dataclass
class GatherCase:
    """What to build: sizes, logits dtype / rank / layout / special values, ids, mask and devices."""
    batch: int
    steps: int
    vocab: int
    dtype: torch.dtype
    rank: int
    layout: str
    scale: float
    specials: list  # (value or "row", position): NaN / inf / -inf at a position, or a whole row of -inf
    ids_dtype: torch.dtype
    ids_shape_ok: bool
    bad_ids: list  # (position, "negative" | "vocab" | "huge")
    mask: str  # "none", "bool", "float", "float_nan", "int", "wrong_shape"
    meta: str  # "", "all", "logits", "ids", "mask": which tensors sit on the meta device
    seed: int = field(default=0)


def mostly(usual, *unusual, weight: int = 12):
    """``usual`` about ``weight`` times as often as each of ``unusual`` (and first, where hypothesis shrinks)."""
    return st.sampled_from([usual] * weight + list(unusual))


@st.composite
def gather_cases(draw):
    return GatherCase(
        batch=draw(st.sampled_from([2, 3, 1, 2, 3, 1, 0])), steps=draw(st.sampled_from([3, 4, 1, 2, 5, 3, 0])),
        vocab=draw(st.sampled_from([17, 64, 2051, 1, 2, 3, 17, 64, 2051, 0])),
        dtype=draw(st.sampled_from(FLOATS * 4 + (torch.int64, torch.bool))),
        rank=draw(mostly(3, 2, 4)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"])),
        scale=draw(st.sampled_from([1.0, 30.0, 1e4])),
        specials=draw(st.one_of(st.just([]), st.lists(st.tuples(
            st.sampled_from([-math.inf, -math.inf, "row", math.nan, math.inf]), st.integers(0, 10**6)), max_size=2))),
        ids_dtype=draw(mostly(torch.int64, torch.int32, torch.float32, weight=8)),
        ids_shape_ok=draw(mostly(True, False, weight=20)),
        bad_ids=draw(st.one_of(st.just([]), st.lists(st.tuples(
            st.integers(0, 10**6), st.sampled_from(["negative", "vocab", "huge"])), max_size=1))),
        mask=draw(st.sampled_from(["none", "bool", "bool", "bool", "float", "int", "float_nan", "wrong_shape"])),
        meta=draw(mostly("", "all", "logits", "ids", "mask", weight=20)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_gather_inputs(case: GatherCase):
    """(logits, ids, mask) for ``case``; logits require grad where they can."""
    g = torch.Generator().manual_seed(case.seed)
    b, t, v = case.batch, case.steps, case.vocab
    values = torch.randn(b, t, v, generator=g, dtype=torch.float64) * case.scale
    flat = values.view(-1, v) if v else values.view(b * t, 0)
    for value, position in case.specials:
        if value == "row" and flat.shape[0]:
            flat[position % flat.shape[0]] = -math.inf
        elif value != "row" and values.numel():
            values.view(-1)[position % values.numel()] = value
    if case.dtype.is_floating_point:
        logits = values.to(case.dtype)
    else:
        logits = values.nan_to_num(0, 0, 0).to(case.dtype)
    if case.layout == "transposed":
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    elif case.layout == "strided":
        storage = torch.zeros(b, t, 2 * v, dtype=logits.dtype)
        storage[..., ::2] = logits
        logits = storage[..., ::2]
    elif case.layout == "expanded" and b:
        logits = logits[:1].expand(b, t, v)
    if case.rank == 2:
        logits = logits.reshape(b * t, v)
    elif case.rank == 4:
        logits = logits.unsqueeze(0)
    if logits.is_floating_point():
        logits = logits.detach().requires_grad_(True)

    ids = torch.randint(0, max(v, 1), (b, t), generator=g)
    for position, kind in case.bad_ids:
        if ids.numel():
            ids.view(-1)[position % ids.numel()] = {"negative": -1, "vocab": v, "huge": 2**40}[kind]
    if case.ids_dtype != torch.int64:
        ids = ids.clamp(-(2**31), 2**31 - 1).to(case.ids_dtype)
    if not case.ids_shape_ok:
        ids = ids.reshape(-1, 1) if ids.numel() != ids.shape[-1] else torch.zeros(b + 1, t, dtype=ids.dtype)

    live = torch.rand(b, t, generator=g) > 0.3
    mask = {"none": None, "bool": live, "float": live.float(), "int": live.int(),
            "float_nan": live.float().masked_fill(~live, math.nan), "wrong_shape": live.T}[case.mask]
    if case.meta:
        moved = {"all": ("logits", "ids", "mask"), "logits": ("logits",), "ids": ("ids",), "mask": ("mask",)}[case.meta]
        logits = logits.detach().to("meta") if "logits" in moved else logits
        ids = ids.to("meta") if "ids" in moved else ids
        mask = mask.to("meta") if "mask" in moved and mask is not None else mask
    return logits, ids, mask


def expected_gather_errors(logits, ids, mask) -> set:
    """The exception types a correct public gather may raise for these inputs; empty when they are valid."""
    tensors = [logits, ids] + ([] if mask is None else [mask])
    if (logits.dim() != 3 or logits.dtype not in FLOATS or logits.shape[-1] == 0
            or ids.dtype not in (torch.int64, torch.int32) or ids.shape != logits.shape[:2]
            or (mask is not None and mask.shape != ids.shape)
            or any(x.device.type != "cpu" for x in tensors)):
        return {ValueError}
    if mask is not None and mask.is_floating_point() and bool(mask.isnan().any()):
        return {ValueError}
    live = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask != 0
    errors = set()
    if bool((live & ((ids < 0) | (ids >= logits.shape[-1]))).any()):
        errors.add(IndexError)
    x = logits.detach().double()
    if bool((live & ~torch.logsumexp(x, -1).isfinite()).any()):
        errors.add(ValueError)
    return errors


def reference_gather(logits, ids, mask):
    """Float64 log-probs [B, T] of valid inputs, 0 on masked rows."""
    x = logits.detach().double().requires_grad_(True)
    live = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask != 0
    safe_ids = torch.where(live, ids.long(), 0)
    rows = torch.where(live.unsqueeze(-1), x, 0.0)
    logp = rows.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, -1)
    return x, torch.where(live, logp, 0.0), live


def grad_tolerance(logits, upstream):
    """[B, T, 1]: rounding to the gradient's dtype, plus the accumulation's error in x - logsumexp, which
    grows with the row's largest finite |logit|."""
    x = logits.detach().double()
    row_scale = x.abs().masked_fill(~x.isfinite(), 0).amax(-1)
    accumulation = EPS[torch.float64 if logits.dtype == torch.float64 else torch.float32]
    relative = 2 * EPS[logits.dtype] + 16 * accumulation * (1 + row_scale)
    return (upstream.double().abs() * relative).unsqueeze(-1) + 1e-6


def assert_matches_reference(logits, ids, mask, actual):
    """Values (and gradients, for float logits) of a successful call against the float64 reference."""
    x, expected, live = reference_gather(logits, ids, mask)
    assert actual.shape == ids.shape and actual.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    row_scale = x.detach().abs().masked_fill(~x.detach().isfinite(), 0).amax(-1) if x.shape[-1] else torch.zeros(ids.shape)
    tolerance = 16 * EPS[torch.float64 if logits.dtype == torch.float64 else torch.float32] * (1 + row_scale)
    difference = (actual.double() - expected.detach()).abs()
    same_inf = actual.double() == expected.detach()  # -inf where the picked logit is -inf
    assert bool((same_inf | (difference <= tolerance)).all()), (actual, expected)
    assert bool((actual[~live] == 0).all())
    if not actual.requires_grad or not ids.numel():
        return
    upstream = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (grad,) = torch.autograd.grad(actual, logits, upstream.to(actual.dtype))
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    assert bool(((grad.double() - expected_grad).abs() <= grad_tolerance(logits, upstream)).all())


def run_and_check(call, expected_errors: set, check_values):
    """``call()`` must raise one of ``expected_errors`` when there are any, else return checked values."""
    try:
        result = call()
    except (ValueError, IndexError) as error:
        assert type(error) in expected_errors, f"raised {type(error).__name__} ({error}) for valid inputs"
        return
    assert not expected_errors, f"returned instead of raising one of {expected_errors}"
    check_values(result)


@pytest.mark.parametrize("backend", ["auto", "eager", "cpp", "triton"])
def test_fuzz_gather_logprobs(backend):
    from distreward import ops

    @SETTINGS
    @given(case=gather_cases())
    def fuzz(case):
        logits, ids, mask = build_gather_inputs(case)
        run_and_check(lambda: ops.gather_logprobs(logits, ids, mask, backend=backend),
                      expected_gather_errors(logits, ids, mask),
                      lambda out: assert_matches_reference(logits, ids, mask, out))

    fuzz()


VOCAB = 48


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@st.composite
def sequence_cases(draw):
    return dict(
        batch=draw(st.sampled_from([2, 3, 1, 0])), steps=draw(st.sampled_from([7, 9, 2, 1, 0])),
        ids_dtype=draw(mostly(torch.int64, torch.int32, torch.float32, torch.bool)),
        bad_id=draw(mostly(None, -1, VOCAB, weight=8)),
        attention=draw(mostly("ones", "left_pad", "left_pad", "wrong_shape", "meta", weight=6)),
        response=draw(mostly("bool", "int", "float", "float_nan", "none", "wrong_shape", "meta", weight=8)),
        chunk_size=draw(st.sampled_from([1, 2, 5, 64] * 4 + [0, -1, True, 2.5])),
        backend=draw(mostly("auto", "eager", "cpp", "triton", "fast", weight=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_sequence_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, t = case["batch"], case["steps"]
    input_ids = torch.randint(0, VOCAB, (b, t), generator=g)
    if case["bad_id"] is not None and input_ids.numel():
        input_ids.view(-1)[int(torch.randint(0, input_ids.numel(), (1,), generator=g))] = case["bad_id"]
    input_ids = input_ids.to(case["ids_dtype"])
    attention = torch.ones(b, t, dtype=torch.long)
    if case["attention"] == "left_pad" and t > 1:
        attention[:, :1] = 0
    attention = {"wrong_shape": attention[:, 1:], "meta": attention.to("meta")}.get(case["attention"], attention)
    response = torch.rand(b, t, generator=g) > 0.4
    response = {"int": response.long(), "float": response.float(), "float_nan": response.float() / response.float(),
                "none": None, "wrong_shape": response.T, "meta": response.to("meta")}.get(case["response"], response)
    return input_ids, attention, response


def expected_sequence_errors(case, input_ids, attention, response) -> set:
    b, t = case["batch"], case["steps"]
    masks_ok = all(isinstance(m, torch.Tensor) and m.shape == (b, t) and m.device.type == "cpu"
                   and not (m.is_floating_point() and bool(m.isnan().any())) for m in (attention, response))
    chunk_ok = isinstance(case["chunk_size"], int) and not isinstance(case["chunk_size"], bool) and case["chunk_size"] > 0
    if (input_ids.dtype not in (torch.int64, torch.int32) or not masks_ok or not chunk_ok
            or case["backend"] not in ("auto", "eager", "cpp", "triton")):
        return {ValueError}
    if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= VOCAB)).any()):
        return {IndexError}
    return set()


def reference_sequence(model, input_ids, attention, response):
    out = torch.zeros(input_ids.shape)
    if input_ids.shape[1] > 1 and input_ids.shape[0]:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.double()
        picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)
        out[:, 1:] = torch.where(response[:, 1:].bool(), picked, 0.0).float()
    return out


def test_fuzz_sequence_logprobs(tiny_model):
    from distreward import sequence_logprobs

    @SETTINGS
    @given(case=sequence_cases())
    def fuzz(case):
        input_ids, attention, response = build_sequence_inputs(case)

        def check(out):
            expected = reference_sequence(tiny_model, input_ids, attention, response)
            assert out.shape == expected.shape and out.dtype == torch.float32
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

        run_and_check(lambda: sequence_logprobs(tiny_model, input_ids, attention, response,
                                                chunk_size=case["chunk_size"], backend=case["backend"]),
                      expected_sequence_errors(case, input_ids, attention, response), check)

    fuzz()


# --- the C++ ops called directly: run in a subprocess by the test below ----------------------------------

def raw_op_call(case: GatherCase, op: str):
    """(call, expected errors, check) of one direct ``torch.ops.distreward`` call. The kernels take exactly
    logits [B, T, V] float, ids [B, T] int64 and mask [B, T] bool (backward: grad_logp [B, T] float and
    lse [B, T] of the accumulation dtype), all on one device; on the meta device they only check that."""
    logits, ids, mask = build_gather_inputs(case)
    logits = logits.detach() if op != "backward_" else logits.detach().contiguous()
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad_logp = torch.randn(ids.shape, dtype=acc).to(ids.device)
    lse = torch.zeros(ids.shape, dtype=acc, device=ids.device)
    if logits.device.type == "cpu" and logits.dim() == 3 and logits.dtype in FLOATS and logits.shape[:2] == ids.shape:
        lse = torch.logsumexp(logits.double(), -1).to(acc).to(ids.device)
    tensors = (logits, ids, mask) if op == "forward" else (grad_logp, logits, ids, mask, lse)
    metadata_ok = (logits.dim() == 3 and logits.dtype in FLOATS and logits.shape[-1] > 0 and ids.dtype == torch.int64
                   and ids.shape == logits.shape[:2] and mask.dtype == torch.bool and mask.shape == ids.shape
                   and len({x.device for x in tensors}) == 1)
    on_meta = logits.device.type == "meta"
    if not metadata_ok or on_meta:
        errors = set() if metadata_ok else {ValueError}
    else:
        errors = expected_gather_errors(logits, ids, mask) - ({ValueError} if op != "forward" else set())
    if op == "forward":
        def check(result):
            if not on_meta:
                assert_matches_reference(logits, ids, mask, result[0])
        return (lambda: torch.ops.distreward.gather_logprobs_forward(*tensors)), errors, check

    def check(result):
        if on_meta:
            return
        grad = logits if op == "backward_" else result
        x = logits_before.double()
        onehot = torch.nn.functional.one_hot(torch.where(mask, ids, 0), x.shape[-1])
        expected = torch.where(mask.unsqueeze(-1), grad_logp.double().unsqueeze(-1) * (onehot - torch.softmax(x, -1)), 0.0)
        close = (grad.double() - expected).abs() <= grad_tolerance(logits_before, grad_logp)
        close |= ~expected.isfinite()  # rows with NaN / +inf: the forward raises for them
        assert bool(close.all())

    logits_before = logits.clone()
    name = "gather_logprobs_backward" if op == "backward" else "gather_logprobs_backward_"
    return (lambda: getattr(torch.ops.distreward, name)(*tensors)), errors, check


def fuzz_cpp_ops_directly():
    """Runs in a subprocess: every case printed to stderr before it runs, so a crash names its case."""
    import distreward.ops.cpp  # noqa: F401

    @SETTINGS
    @given(case=gather_cases(), op=st.sampled_from(["forward", "forward", "backward", "backward_"]))
    def fuzz(case, op):
        print(op, case, file=sys.stderr, flush=True)
        call, errors, check = raw_op_call(case, op)
        run_and_check(call, errors, check)

    fuzz()
    print("fuzzed the C++ ops", flush=True)


def test_fuzz_cpp_ops_directly_in_a_subprocess():
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, DISTREWARD_FUZZ_EXAMPLES=str(EXAMPLES)))
    last_case = done.stderr.strip().splitlines()[-1:] or ["(none)"]
    assert done.returncode >= 0, f"the process crashed (signal {-done.returncode}) on: {last_case[0]}"
    assert done.returncode == 0 and "fuzzed the C++ ops" in done.stdout, done.stderr[-4000:]


if __name__ == "__main__":
    fuzz_cpp_ops_directly()
