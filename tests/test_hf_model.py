"""The reward model as a Hugging Face model: what ``save_reward_model`` writes, loading with the Auto classes
(registered by ``import distreward``, and through ``trust_remote_code`` in a process that cannot import distreward), the
legacy format, and reward-bench's scoring replayed on local pairs (docs/integrations.md)."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

import distreward
from distreward import ops, rm_metrics
from distreward.data import EMBEDDED, load_raw_preferences, to_messages, tokenize_pairs
from distreward.modeling import (LEGACY_CONFIG_NAME, DistRewardConfig, DistRewardForSequenceClassification,
                                 load_reward_model, save_reward_model)
from distreward.tiny import build_tiny_policy

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
VARIANTS = {"distribution": {}, "bins_1_to_5": {"num_bins": 7, "low": 1.0, "high": 5.0}, "scalar": {"head": "scalar"}}
CONVERSATIONS = [("What is 2 + 3?", "5"), ("Sort: 3 1 2", "1 2 3"), ("How many a in: banana?", "There are three.")]


def chat_texts(tokenizer, conversations=CONVERSATIONS) -> list:
    """Each (prompt, answer) as the chat-templated text reward-bench scores."""
    return [tokenizer.apply_chat_template(to_messages(prompt, answer), tokenize=False)
            for prompt, answer in conversations]


def library_moments(bin_logits: torch.Tensor, model) -> tuple:
    """(mean, std) [B] as the library computes them from the bin logits (eager ops; a scalar head's value and 0)."""
    if model.is_scalar:
        return bin_logits[:, 0], torch.zeros(len(bin_logits))
    return ops.dist_moments(bin_logits, ops.bin_centers(model.num_bins, model.low, model.high), backend="eager")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """name -> (directory written by save_reward_model, the model saved there, in eval mode)."""
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for name, settings in VARIANTS.items():
        torch.manual_seed(0)
        model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL),
                                                                  **settings).eval()
        save_reward_model(model, tokenizer, root / name)
        models[name] = (root / name, model)
    return models


def test_save_writes_a_model_directory_with_its_code_tokenizer_and_card(saved):
    directory, model = saved["distribution"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "distreward" and config["architectures"] == ["DistRewardForSequenceClassification"]
    assert config["auto_map"] == {
        "AutoConfig": "modeling_distreward.DistRewardConfig",
        "AutoModelForSequenceClassification": "modeling_distreward.DistRewardForSequenceClassification"}
    assert (config["num_bins"], config["low"], config["high"], config["head"]) == (10, 0.0, 1.0, "distribution")
    assert config["backbone_config"]["model_type"] == "llama" and config["backbone_config"]["hidden_size"] == 32
    source = os.path.join(os.path.dirname(distreward.__file__), "modeling_distreward.py")
    assert (directory / "modeling_distreward.py").read_text() == open(source).read()
    card = (directory / "README.md").read_text()
    assert "`logits` [B, 1]" in card and "trust_remote_code=True" in card and "linspace(0.0, 1.0, 10)" in card
    assert not (directory / "rm_config.json").exists()  # the run's settings are the rm stage's to write


def test_the_saved_tokenizer_has_no_transformers_5_only_names_and_encodes_alike(saved, tokenizer):
    """transformers 4.5x has no ``TokenizersBackend`` class: the saved tokenizer names 4.x's class for a
    tokenizer.json-only tokenizer, and carries its chat template in tokenizer_config.json."""
    directory, _ = saved["distribution"]
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in settings
    assert settings["chat_template"] == tokenizer.chat_template and not (directory / "chat_template.jinja").exists()
    loaded = AutoTokenizer.from_pretrained(directory)
    assert chat_texts(loaded) == chat_texts(tokenizer)
    assert loaded(chat_texts(loaded))["input_ids"] == tokenizer(chat_texts(tokenizer))["input_ids"]
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == (tokenizer.pad_token, tokenizer.eos_token,
                                                                     tokenizer.bos_token)


@pytest.mark.parametrize("name", VARIANTS)
def test_the_auto_classes_load_the_registered_model(saved, tokenizer, name):
    """``import distreward`` registers the classes: no trust_remote_code. The bin centers come from the config
    (no buffer that transformers 5's meta-device loading could leave uninitialised) and logits[:, 0] is the mean."""
    directory, model = saved[name]
    assert type(AutoConfig.from_pretrained(directory)) is DistRewardConfig
    loaded = AutoModelForSequenceClassification.from_pretrained(directory)
    assert type(loaded) is DistRewardForSequenceClassification
    assert not loaded.training and not any(module.training for module in loaded.modules())
    assert [buffer for buffer, _ in loaded.named_buffers() if not buffer.startswith("backbone.")] == []
    if model.is_scalar:
        assert loaded.centers is None
    else:
        torch.testing.assert_close(loaded.centers, torch.linspace(model.low, model.high, model.num_bins),
                                   rtol=0, atol=0)
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output, expected = loaded(**batch), model(**batch)
    torch.testing.assert_close(output.bin_logits, expected.bin_logits, rtol=1e-6, atol=1e-6)  # kernel choice: 1 ulp
    mean, std = library_moments(output.bin_logits, loaded)
    assert output.logits.shape == (3, 1)
    torch.testing.assert_close(output.logits[:, 0], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.std, std, rtol=0, atol=1e-6)


def test_distreward_puts_its_fused_moments_in_the_model_and_the_rm_stage_its_backend(tmp_path):
    """One model class: the saved file's plain softmax moments, replaced on ``import distreward`` by
    ``ops.dist_moments``; the rm stage's ``--ops_backend`` picks that op's backend for its model."""
    from distreward.modeling_distreward import softmax_moments
    from distreward.rm_trainer import RewardConfig, load_backbone

    assert DistRewardForSequenceClassification.moments is ops.dist_moments
    logits, centers = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), ops.bin_centers(10)
    for expected, computed in zip(ops.dist_moments(logits, centers, backend="eager"), softmax_moments(logits, centers)):
        torch.testing.assert_close(computed, expected, rtol=0, atol=1e-6)
    model, _ = load_backbone(RewardConfig(output_dir=str(tmp_path), model_name_or_path="embedded",
                                          ops_backend="eager"))
    assert model.moments.func is ops.dist_moments and model.moments.keywords == {"backend": "eager"}
    model, _ = load_backbone(RewardConfig(output_dir=str(tmp_path), model_name_or_path="embedded"))
    assert model.moments is ops.dist_moments  # auto: the class's


# Runs with `python -S` (no site-packages .pth files, so no editable install of distreward) and the interpreter's
# site-packages on PYTHONPATH, in a directory outside the repository.
REMOTE_CODE_SCRIPT = """
import importlib.util, json, sys
assert importlib.util.find_spec("distreward") is None, "distreward is importable"
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
results = {}
for directory in sys.argv[2:]:
    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)  # transformers 5 reads the config
    batch = tokenizer(json.loads(sys.argv[1]), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model(**batch)
    results[directory] = {
        "module": type(model).__module__, "training": any(module.training for module in model.modules()),
        "centers": None if model.centers is None else model.centers.tolist(),
        **{key: getattr(output, key).tolist() for key in ("logits", "bin_logits", "mean", "std")}}
print(json.dumps(results))
"""


def test_trust_remote_code_loads_it_in_a_process_without_distreward(saved, tokenizer, tmp_path):
    directories = [str(directory) for directory, _ in saved.values()]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-S", "-c", REMOTE_CODE_SCRIPT, json.dumps(chat_texts(tokenizer)),
                           *directories], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    for directory, (_, model) in zip(directories, saved.values()):
        result = results[directory]
        assert result["module"].startswith("transformers_modules.") and not result["training"]
        with torch.no_grad():
            expected = model(**batch)
        bin_logits = torch.tensor(result["bin_logits"])
        torch.testing.assert_close(bin_logits, expected.bin_logits, rtol=0, atol=1e-6)
        mean, std = library_moments(bin_logits, model)
        torch.testing.assert_close(torch.tensor(result["logits"])[:, 0], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["std"]), std, rtol=0, atol=1e-6)
        assert result["centers"] == (None if model.is_scalar else model.centers.tolist())


def write_legacy_directory(model, tokenizer, directory) -> None:
    """A reward model as the rm stage saved it before the Hugging Face model: model.safetensors (backbone.* and
    head.*), reward_model_config.json (head settings and backbone_config) and the run's settings in config.json."""
    directory.mkdir()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    settings = {"num_bins": model.num_bins, "low": model.low, "high": model.high, "head": model.config.head,
                "backbone_config": model.backbone.config.to_dict()}
    (directory / LEGACY_CONFIG_NAME).write_text(json.dumps(settings))
    (directory / "config.json").write_text(json.dumps({"loss_kind": "bt_kl", "num_bins": model.num_bins}))
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("name", ["bins_1_to_5", "scalar"])
def test_a_legacy_directory_loads_and_saves_in_the_new_format(saved, tokenizer, tmp_path, name):
    _, model = saved[name]
    write_legacy_directory(model, tokenizer, tmp_path / "legacy")
    loaded, loaded_tokenizer = load_reward_model(str(tmp_path / "legacy"), None)
    assert type(loaded) is DistRewardForSequenceClassification and not loaded.training
    assert (loaded.num_bins, loaded.low, loaded.high, loaded.is_scalar) == (model.num_bins, model.low, model.high,
                                                                            model.is_scalar)
    batch = loaded_tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).bin_logits, model(**batch).bin_logits, rtol=1e-6, atol=1e-6)
        save_reward_model(loaded, loaded_tokenizer, tmp_path / "converted")
        again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "converted")
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-6)


def test_reward_bench_scoring_matches_our_pairwise_accuracy(saved):
    """reward-bench's ``rewardbench`` command for a sequence classifier: the text-classification pipeline over the
    chat-templated chosen and rejected conversations (raw logits, left padding), a pair correct when the chosen score
    is the higher. Its verdict on each pair must be our evaluation's (right padding), on every pair whose scores are
    not a near-tie (where the last bits of float32 decide), and our reported accuracy is the mean of our verdicts."""
    directory, _ = saved["distribution"]
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    raw = load_raw_preferences(EMBEDDED, num_pairs=24, seed=0, split="test")
    reward_pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    kwargs = {"batch_size": 4, "truncation": False, "padding": True, "max_length": 256, "function_to_apply": "none",
              "return_token_type_ids": False}
    scores = {side: [result["score"] for result in reward_pipe(
        chat_texts(tokenizer, zip(raw["prompt"], raw[side])), **kwargs)] for side in ("chosen", "rejected")}
    results = [1 if chosen > rejected else 0 for chosen, rejected in zip(scores["chosen"], scores["rejected"])]

    predictions = rm_metrics.predict(model, tokenize_pairs(tokenizer, raw, 0.0, 4.0, 256), tokenizer.pad_token_id)
    means = {}
    for side in ("chosen", "rejected"):
        means[side] = rm_metrics.rewards(predictions[f"logits_{side}"], predictions["centers"])
        torch.testing.assert_close(torch.tensor(scores[side]), means[side], rtol=0, atol=1e-5)
    ours = means["chosen"] > means["rejected"]
    clear = (torch.tensor(scores["chosen"]) - torch.tensor(scores["rejected"])).abs() > 1e-4  # 10x the tolerance
    assert clear.sum() >= 8
    assert torch.equal(torch.tensor(results, dtype=torch.bool)[clear], ours[clear])
    assert 0 < int(ours[clear].sum()) < int(clear.sum())  # both outcomes occur: the comparison is exercised
    accuracy = rm_metrics.reward_metrics(predictions)["pairwise_accuracy"]  # a float32 mean
    assert ours.double().mean().item() == pytest.approx(accuracy, rel=0, abs=1e-6)
