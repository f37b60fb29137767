"""The reward server (distreward.serve) and its OpenRLHF / verl plugins: scores equal the library's in-process
ones, bad requests get a 4xx JSON answer and the server keeps serving, concurrent clients each get their own
scores from batched forwards, a bad model directory is one line at start."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from distreward import serve
from distreward.data import render, to_messages
from distreward.integrations import client, openrlhf, verl
from distreward.modeling import DistRewardForSequenceClassification, load_reward_model, save_reward_model
from distreward.rewards import distribution_quantile
from distreward.rollout import Rollout, RolloutScorer
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
MAX_BATCH_SIZE = 8
PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "Sort: 3 1 2"}], "How many a in: banana?"]
COMPLETIONS = ["3", "1 2 3", "three"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny saved reward model with its tokenizer, as the rm stage writes one."""
    path = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL))
    save_reward_model(model, tokenizer, str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer):
    """The RL stage's scorer on the same saved model, in process."""
    model, reward_tokenizer = load_reward_model(model_dir, None)
    return RolloutScorer(build_tiny_policy(tokenizer, **SMALL), model, reward_tokenizer)


def rl_stage_output(reference, prompts, completions):
    """The reward model's output as the RL stage computes it for (prompt, completion) pairs."""
    empty = torch.zeros(len(prompts), 1, dtype=torch.long)
    return reference.reward(Rollout(empty, empty, empty.bool(), list(prompts), list(completions)))


@pytest.fixture(scope="module")
def server(model_dir):
    """The server on an ephemeral loopback port, serving from a thread."""
    args = serve.build_parser().parse_args([model_dir, "--port", "0", "--max_batch_size", str(MAX_BATCH_SIZE),
                                            "--max_wait_ms", "20"])
    server = serve.build_server(args)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server
    server.stop()
    thread.join()


def request(server, method, path, body=None, headers=None):
    """(status, decoded JSON answer) of one raw HTTP request."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def test_scores_equal_the_rl_stage_reward_model(server, reference):
    result = client.score({"prompts": PROMPTS, "completions": COMPLETIONS}, url=server.url)
    expected = rl_stage_output(reference, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(result["mean"]), expected.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["std"]), expected.std, rtol=0, atol=1e-6)
    assert result["rewards"] == result["mean"]  # no shaping by default
    assert sorted(result["quantiles"]) == ["0.25", "0.5", "0.75"]
    for level, values in result["quantiles"].items():
        torch.testing.assert_close(torch.tensor(values), distribution_quantile(expected.bin_logits, float(level)),
                                   rtol=0, atol=1e-6)
    conversations = [to_messages(prompt, completion) for prompt, completion in zip(PROMPTS, COMPLETIONS)]
    by_messages = client.score({"messages": conversations}, url=server.url)
    by_texts = client.score({"texts": ["".join(render(server.tokenizer, conversation))
                                       for conversation in conversations]}, url=server.url)
    torch.testing.assert_close(torch.tensor(by_messages["mean"]), expected.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(by_texts["mean"]), expected.mean, rtol=0, atol=1e-6)


def test_a_request_above_max_batch_size_is_scored_in_chunks(server, reference):
    prompts = [f"What is {i} + 1?" for i in range(2 * MAX_BATCH_SIZE + 3)]
    completions = [str(i + 1) for i in range(len(prompts))]
    before = server.scorer.forward_sizes()
    result = client.score({"prompts": prompts, "completions": completions}, url=server.url)
    torch.testing.assert_close(torch.tensor(result["mean"]), rl_stage_output(reference, prompts, completions).mean,
                               rtol=0, atol=1e-5)
    assert server.scorer.forward_sizes() - before == Counter({MAX_BATCH_SIZE: 2, 3: 1})


BAD_REQUESTS = {
    "malformed JSON": ("POST", "/score", b'{"texts": ["a"', 400, "malformed JSON"),
    "not UTF-8": ("POST", "/score", b'\xff\xfe', 400, "malformed JSON"),
    "not an object": ("POST", "/score", b'["a"]', 400, "JSON object"),
    "no form": ("POST", "/score", b'{}', 400, "exactly one of"),
    "two forms": ("POST", "/score", b'{"texts": ["a"], "messages": []}', 400, "exactly one of"),
    "unknown field": ("POST", "/score", b'{"text": ["a"]}', 400, "unknown field"),
    "wrong type": ("POST", "/score", b'{"texts": [1]}', 400, r"texts\[0\] must be a string"),
    "not a list": ("POST", "/score", b'{"texts": "a"}', 400, "non-empty list"),
    "empty list": ("POST", "/score", b'{"texts": []}', 400, "non-empty list"),
    "empty text": ("POST", "/score", b'{"texts": [""]}', 400, "no token"),
    "mismatched lengths": ("POST", "/score", b'{"prompts": ["a", "b"], "completions": ["c"]}', 400,
                           "2 items and 'completions' 1"),
    "bad message": ("POST", "/score", b'{"messages": [[{"role": "user"}]]}', 400, r"messages\[0\]\[0\] must be"),
    "no assistant turn": ("POST", "/score", b'{"messages": [[{"role": "user", "content": "a"}]]}', 400,
                          "must end with the assistant"),
    "too long": ("POST", "/score", json.dumps({"texts": ["a" * 300]}).encode(), 400, "more than the server's"),
    "OpenRLHF without query": ("POST", "/openrlhf", b'{"prompts": ["a"]}', 400, "OpenRLHF request"),
    "unknown endpoint": ("POST", "/reward", b'{}', 404, "no endpoint POST /reward"),
    "wrong method": ("GET", "/score", None, 405, "use POST"),
    "too large": ("POST", "/score", b'{"texts": ["' + b"a" * 200 + b'"]}', 413, "more than 100"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, case, monkeypatch):
    method, path, body, status, message = BAD_REQUESTS[case]
    if status == 413:
        monkeypatch.setattr(serve, "MAX_BODY_BYTES", 100)
    answer_status, answer = request(server, method, path, body)
    assert answer_status == status and list(answer) == ["error"] and re.search(message, answer["error"])
    assert request(server, "POST", "/score", b'{"texts": ["abc"]}')[0] == 200


def test_a_conversation_the_chat_template_refuses_is_a_request_error():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(serve.RequestError, match="roles must alternate"):
        serve.request_sequences(tokenizer, {"prompts": ["a"], "completions": ["b"]})


def test_a_post_without_content_length_gets_411(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.putrequest("POST", "/score")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()
    assert request(server, "POST", "/score", b'{"texts": ["abc"]}')[0] == 200


def test_the_client_raises_the_servers_error(server):
    with pytest.raises(RuntimeError, match=r"answered 400: texts\[0\] must be a string"):
        client.score({"texts": [1]}, url=server.url)
    closed = server.url.rsplit(":", 1)[0] + ":1"
    with pytest.raises(RuntimeError, match="unreachable"):
        client.score({"texts": ["a"]}, url=closed, retries=0)
    with pytest.raises(ValueError, match="DISTREWARD_SERVER_URL"):
        client.server_url(None)


def test_an_internal_error_is_500_json_and_the_server_keeps_serving(server, monkeypatch):
    def failing_forward(sequences):
        raise RuntimeError("the accelerator fell off")

    monkeypatch.setattr(server.scorer, "forward", failing_forward)
    status, answer = request(server, "POST", "/score", b'{"texts": ["abc"]}')
    assert status == 500 and answer == {"error": "internal error: RuntimeError: the accelerator fell off"}
    monkeypatch.undo()
    assert request(server, "POST", "/score", b'{"texts": ["abc"]}')[0] == 200


def test_health_names_the_model_and_its_bins(server, model_dir):
    status, answer = request(server, "GET", "/health")
    assert status == 200 and answer["status"] == "ok" and answer["model"] == model_dir
    assert answer["num_bins"] == 10 and answer["bin_range"] == [0.0, 1.0] and answer["max_length"] == 256


def test_concurrent_clients_each_get_their_own_scores_from_batched_forwards(server, reference):
    clients, requests_each = 16, 8
    texts = {(c, r): [f"client {c} request {r} item {i}" for i in range(1 + (c + r) % 3)]
             for c in range(clients) for r in range(requests_each)}
    answers, errors = {}, []

    def run(c):
        try:
            for r in range(requests_each):
                answers[c, r] = client.score({"texts": texts[c, r]}, url=server.url, retries=0)["mean"]
        except Exception as error:  # reported below: a lost request fails the test
            errors.append(error)

    before = server.scorer.forward_sizes()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) == clients * requests_each
    flat = [text for key in sorted(texts) for text in texts[key]]
    batch = server.tokenizer(flat, return_tensors="pt", padding=True, add_special_tokens=False)
    expected = dict(zip(flat, reference.reward_model(batch["input_ids"], batch["attention_mask"]).mean.tolist()))
    for key, means in answers.items():
        assert means == pytest.approx([expected[text] for text in texts[key]], abs=1e-5)
    sizes = server.scorer.forward_sizes() - before
    assert sum(size * count for size, count in sizes.items()) == len(flat)  # every sequence scored once
    assert max(sizes) > 1 and max(sizes) <= MAX_BATCH_SIZE  # concurrent requests shared forwards


def test_shapings_follow_shape_rewards(reference):
    model = reference.reward_model
    for shaping, expected in (("std_penalty", lambda out: out.mean - 0.3 * out.std),
                              ("std_scale", lambda out: out.mean / (out.std + 1)),
                              ("quantile", lambda out: distribution_quantile(out.bin_logits, 0.1))):
        scorer = serve.BatchScorer(model, reference.reward_tokenizer.pad_token_id, shaping=shaping, alpha=0.3,
                                   quantile_level=0.1)
        try:
            result = scorer.submit([[5, 6, 7], [8, 9]]).result()
        finally:
            scorer.close()
        output = model(torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        torch.testing.assert_close(torch.tensor(result["rewards"]), expected(output), rtol=0, atol=1e-6)
        assert result["quantiles"] == {}


def test_a_scalar_reward_model_serves_its_value_without_quantiles(tokenizer):
    model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, **SMALL), head="scalar")
    with pytest.raises(ValueError, match="scalar reward model has no distribution"):
        serve.BatchScorer(model, tokenizer.pad_token_id, quantiles=(0.5,))
    scorer = serve.BatchScorer(model, tokenizer.pad_token_id)
    try:
        result = scorer.submit([[5, 6, 7]]).result()
    finally:
        scorer.close()
    expected = model(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]))
    assert result["rewards"] == result["mean"] == expected.logits[:, 0].tolist()
    assert result["std"] == [0.0] and result["quantiles"] == {}


def test_openrlhf_route_and_reward_func_match(server, reference, monkeypatch):
    conversations = [to_messages(prompt, completion) for prompt, completion in zip(PROMPTS, COMPLETIONS)]
    queries = ["".join(render(server.tokenizer, conversation)) for conversation in conversations]
    status, answer = request(server, "POST", "/openrlhf", json.dumps(
        {"query": queries, "prompts": [render(server.tokenizer, c)[0] for c in conversations],
         "labels": [None] * 3}).encode())
    expected = rl_stage_output(reference, PROMPTS, COMPLETIONS)
    assert status == 200 and answer["scores"] == answer["rewards"]
    torch.testing.assert_close(torch.tensor(answer["rewards"]), expected.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(answer["extra_logs"]["rm_std"]), expected.std, rtol=0, atol=1e-6)
    monkeypatch.setenv(client.SERVER_URL_ENV, server.url)
    assert openrlhf.reward_func(queries, ["unused"] * 3, [None] * 3) == answer


def test_verl_compute_score_and_its_batch_variant_match(server, reference, monkeypatch):
    monkeypatch.setenv(client.SERVER_URL_ENV, server.url)
    expected = rl_stage_output(reference, PROMPTS, COMPLETIONS)
    one = verl.compute_score("embedded", COMPLETIONS[0], "3", extra_info={"question": PROMPTS[0], "index": 0})
    assert sorted(one) == ["rm_mean", "rm_std", "score"] and one["score"] == one["rm_mean"]
    assert one["score"] == pytest.approx(float(expected.mean[0]), abs=1e-6)
    batch = verl.compute_score_batch(data_sources=["embedded"] * 3, solution_strs=COMPLETIONS,
                                     ground_truths=[None] * 3, extra_infos=[{"prompt": p} for p in PROMPTS],
                                     prompt_key="prompt", reward_router_address=None)
    torch.testing.assert_close(torch.tensor([row["score"] for row in batch]), expected.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor([row["rm_std"] for row in batch]), expected.std, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"extra_info\['question'\].*\['index'\]"):
        verl.compute_score("embedded", "3", "3", extra_info={"index": 0})


def test_stop_answers_the_requests_in_flight(model_dir):
    server = serve.build_server(serve.build_parser().parse_args([model_dir, "--port", "0"]))
    forward, submit, submitted = server.scorer.forward, server.scorer.submit, []

    def slow_forward(sequences):
        time.sleep(0.3)
        return forward(sequences)

    def counted_submit(sequences):
        submitted.append(sequences)
        return submit(sequences)

    server.scorer.forward, server.scorer.submit = slow_forward, counted_submit
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    answers = []
    clients = [threading.Thread(target=lambda: answers.append(request(server, "POST", "/score", b'{"texts": ["a"]}')))
               for _ in range(3)]
    for client_thread in clients:
        client_thread.start()
    deadline = time.monotonic() + 60
    while len(submitted) < 3 and time.monotonic() < deadline:  # all three in flight
        time.sleep(0.01)
    server.stop()
    thread.join()
    for client_thread in clients:
        client_thread.join()
    assert [status for status, _ in answers] == [200, 200, 200]
    with pytest.raises(serve.RequestError, match="shutting down"):
        submit([[5]])


def run_command(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "distreward.serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_a_missing_model_dir_is_one_line_and_exit_1(tmp_path):
    stdout, stderr = run_command(str(tmp_path / "rm"), "--port", "0").communicate(timeout=300)
    assert stderr.splitlines() == [f"distreward.serve: error: cannot serve {tmp_path / 'rm'}: no reward model in "
                                   f"{tmp_path / 'rm'}: run `python -m distreward.train rm` first or set "
                                   f"--reward_model_path"] and stdout == ""


@pytest.mark.parametrize("broken", ["corrupt weights", "no tokenizer", "port taken"])
def test_a_model_that_fails_to_load_or_bind_is_one_line_and_exit_1(tmp_path, model_dir, server, broken, capfd):
    """In process (the command itself is tested above): anything failing at start is one line on stderr."""
    path = tmp_path / "rm"
    path.mkdir()
    for name in os.listdir(model_dir):
        if not (broken == "no tokenizer" and name.startswith("tokenizer")):
            (path / name).write_bytes((Path(model_dir) / name).read_bytes())
    if broken == "corrupt weights":
        (path / "model.safetensors").write_bytes(b"not a safetensors file")
    port = str(server.server_address[1]) if broken == "port taken" else "0"
    assert serve.main([str(path), "--port", port]) == 1
    stdout, stderr = capfd.readouterr()
    reason = {"corrupt weights": "", "no tokenizer": "holds no tokenizer", "port taken": "Address already in use"}
    assert stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"distreward.serve: error: cannot serve {path}: ") and reason[broken] in stderr


def test_the_command_prints_its_url_serves_and_stops_on_sigterm(model_dir):
    process = run_command(model_dir, "--port", "0")
    try:
        ready = process.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+) ", ready).group(1)
        with urllib.request.urlopen(f"{url}/health", timeout=60) as response:
            assert json.loads(response.read())["model"] == model_dir
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and stdout.strip() == "distreward.serve: stopped" and stderr == "", stderr
