"""The scalar reward-model baselines (scalar_bt, scalar_reg) and the Bradley-Terry margin temperature."""
import pytest
import torch
import torch.nn.functional as F

from distreward import ops
from distreward.modeling import DistRewardForSequenceClassification
from distreward.rm_trainer import RewardConfig
from distreward.tiny import build_tiny_policy

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def pair_inputs(rows=6, bins=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = (torch.randn(rows, bins, generator=g, dtype=dtype).mul(3).requires_grad_(True)
                        for _ in range(2))
    targets = tuple(torch.rand(rows, generator=g, dtype=dtype) for _ in range(2))
    return chosen, rejected, targets


@pytest.mark.parametrize("kind", ["bt_mean", "bt_kl"])
@pytest.mark.parametrize("temperature", [0.1, 3.0])
def test_triton_matches_eager_with_a_temperature(kind, temperature):
    chosen, rejected, targets = pair_inputs(rows=33, dtype=torch.float32)
    losses = [ops.pair_loss(chosen, rejected, *targets, kind=kind, temperature=temperature, backend=backend)
              for backend in ("eager", "triton")]
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-5, atol=1e-5)
    grads = [torch.autograd.grad(loss, (chosen, rejected)) for loss in losses]
    for fused, eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


@pytest.mark.parametrize("kind", ["bt_mean", "bt_kl"])
def test_temperature_divides_the_margin(kind):
    chosen, rejected, targets = pair_inputs()
    centers = ops.bin_centers(10, dtype=torch.float64)
    margin = ops.dist_moments(chosen, centers)[0] - ops.dist_moments(rejected, centers)[0]
    change = (F.softplus(-margin / 0.25) - F.softplus(-margin)).mean()
    default = ops.pair_loss(chosen, rejected, *targets, kind=kind, backend="eager")
    tempered = ops.pair_loss(chosen, rejected, *targets, kind=kind, backend="eager", temperature=0.25)
    torch.testing.assert_close(tempered - default, change)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_temperature_one_is_the_untempered_loss(kind, backend):
    """Both backends at temperature 1 give the loss as it was before the temperature existed (the formulas
    of docs/math.md §3, written out here for bt_mean; bt_kl and dpl against their keyword-free call)."""
    chosen, rejected, targets = pair_inputs()
    centers = ops.bin_centers(10, dtype=torch.float64)
    untempered = ops.pair_loss(chosen, rejected, *targets, kind=kind, centers=centers, backend=backend)
    assert ops.pair_loss(chosen, rejected, *targets, kind=kind, centers=centers, backend=backend,
                         temperature=1.0).item() == untempered.item()
    if kind == "bt_mean":
        means = [(z.softmax(-1) * centers).sum(-1) for z in (chosen, rejected)]
        expected = -torch.nn.functional.logsigmoid(means[0] - means[1]).mean()
        assert untempered.item() == pytest.approx(expected.item(), rel=1e-12)


def test_float64_gradcheck_with_a_temperature():
    chosen, rejected, targets = pair_inputs(rows=3, bins=5)
    centers = ops.bin_centers(5, dtype=torch.float64)
    for kind in ("bt_mean", "bt_kl"):
        assert torch.autograd.gradcheck(lambda a, b: ops.reference.pair_loss(
            a, b, *targets, kind=kind, centers=centers, temperature=0.3), (chosen, rejected))
    for kind in ops.SCALAR_LOSS_KINDS:
        assert torch.autograd.gradcheck(lambda a, b: ops.reference.scalar_pair_loss(
            a[:, 0], b[:, 0], *targets, kind=kind, score_weight=2.0, temperature=0.3), (chosen, rejected))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_temperature_raises_value_error(temperature):
    chosen, rejected, targets = pair_inputs()
    with pytest.raises(ValueError, match="temperature"):
        ops.pair_loss(chosen, rejected, *targets, kind="bt_mean", temperature=temperature)
    with pytest.raises(ValueError, match="margin_temperature"):
        RewardConfig(output_dir="unused", margin_temperature=temperature)


def test_dpl_has_no_margin_to_temper():
    chosen, rejected, targets = pair_inputs()
    for backend in ("eager", "triton"):
        with pytest.raises(ValueError, match="dpl"):
            ops.pair_loss(chosen, rejected, *targets, kind="dpl", temperature=0.5, backend=backend)
    with pytest.raises(ValueError, match="dpl"):
        RewardConfig(output_dir="unused", loss_kind="dpl", margin_temperature=0.5)


def test_scalar_losses_by_hand():
    reward_c, reward_r = torch.tensor([[0.9], [0.2]]), torch.tensor([[0.1], [0.6]])
    mu_c, mu_r = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.25])
    bt = (F.softplus(torch.tensor(-0.8)) + F.softplus(torch.tensor(0.4))) / 2
    torch.testing.assert_close(ops.pair_loss(reward_c, reward_r, kind="scalar_bt"), bt)
    squared = ((0.01 + 0.01) / 2 + (0.09 + 0.1225) / 2) / 2
    torch.testing.assert_close(ops.pair_loss(reward_c, reward_r, mu_c, mu_r, kind="scalar_reg", score_weight=2.0),
                               bt + 2.0 * torch.tensor(squared))
    tempered = (F.softplus(torch.tensor(-8.0)) + F.softplus(torch.tensor(4.0))) / 2
    torch.testing.assert_close(ops.pair_loss(reward_c, reward_r, kind="scalar_bt", temperature=0.1), tempered)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.pair_loss(torch.zeros(2, 10), torch.zeros(2, 10), kind="scalar_bt"), "1 entries"),
    (lambda: ops.pair_loss(torch.zeros(2, 1), torch.zeros(2, 1), kind="scalar_reg"), "target_chosen"),
    (lambda: ops.pair_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0.0, 2.0]), torch.zeros(2),
                           kind="scalar_reg"), "target_chosen must lie in"),
    (lambda: ops.pair_loss(torch.zeros(2, 1), torch.zeros(2, 1), kind="scalar_bt", backend="triton"), "eager"),
    (lambda: ops.pair_loss(torch.zeros(2, 1), torch.zeros(2, 1), kind="bt_mean"), "at least 2 bins"),
])
def test_bad_scalar_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scalar_head_outputs_and_round_trip(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL),
                                                              head="scalar")
    assert model.is_scalar and model.centers is None and model.head.out_features == 1
    batch = tokenizer(["What is 1 + 2?", "Sort: 3 1"], return_tensors="pt", padding=True)
    output = model.eval()(batch["input_ids"], batch["attention_mask"])
    assert output.logits.shape == (2, 1) and output.mean.shape == (2,) and output.mean.dtype == torch.float32
    torch.testing.assert_close(output.mean, output.logits[:, 0])
    torch.testing.assert_close(output.bin_logits, output.logits)
    assert output.std.tolist() == [0.0, 0.0]
    model.save_pretrained(tmp_path)
    loaded = DistRewardForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.is_scalar
    torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]).mean, output.mean)
    with pytest.raises(ValueError, match="head must be one of"):
        DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL),
                                                          head="gaussian")


def test_the_loss_kind_picks_the_head():
    assert RewardConfig(output_dir="unused", loss_kind="scalar_reg").is_scalar
    assert not RewardConfig(output_dir="unused", loss_kind="bt_kl").is_scalar
    with pytest.raises(ValueError, match="no triton backend"):
        RewardConfig(output_dir="unused", loss_kind="scalar_bt", ops_backend="triton")
