"""The reward server: ``python -m distreward.serve MODEL_DIR`` scores texts over HTTP with a saved reward model.

Standard library HTTP (``ThreadingHTTPServer``, one thread per connection) in front of one worker thread that owns
the model: it groups the sequences of concurrent requests into one forward of at most ``--max_batch_size``
sequences, waiting at most ``--max_wait_ms`` for more after the first arrives. JSON in and out
(docs/integrations.md, "Reward server"):

- ``POST /score`` with exactly one of
  ``{"prompts": [P, ...], "completions": [str, ...]}``: P a user message (a string) or a chat message list; each
  pair is rendered and tokenized as the RL stage gives it to the reward model
  (:func:`distreward.data.conversation_ids` of :func:`distreward.data.to_messages`);
  ``{"messages": [[{"role": ..., "content": ...}, ..., {"role": "assistant", ...}], ...]}``: whole conversations,
  rendered alike;
  ``{"texts": [str, ...]}``: already rendered, tokenized as they are (no special tokens added);
  answers ``{"rewards": [...], "mean": [...], "std": [...], "quantiles": {"0.25": [...], ...}}``, one entry per
  item, in order (``rewards`` is the mean unless ``--shaping`` says otherwise);
- ``POST /openrlhf`` with OpenRLHF's remote reward request ``{"query": [...], "prompts": [...], "labels": [...]}``
  (the queries scored as ``texts``) answers ``{"rewards", "scores", "extra_logs"}``
  (:func:`distreward.integrations.openrlhf.openrlhf_reply`);
- ``GET /health``: the model, its bins and the server's settings.

A bad request gets a 4xx answer ``{"error": "..."}``, a failure inside the server a 500 one; either way the server
keeps serving. SIGINT / SIGTERM stop it after the requests in flight are answered.
"""
import argparse
import json
import queue
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

import torch
from jinja2 import TemplateError
from transformers.utils import logging as transformers_logging

from distreward.cli import argument_parser
from distreward.data import conversation_ids, padded_batch, to_messages
from distreward.defaults import ALPHA, QUANTILE_LEVEL
from distreward.integrations.openrlhf import openrlhf_reply
from distreward.modeling import load_reward_model
from distreward.rewards import SHAPINGS, check_level, check_shaping, distribution_quantile, shape_rewards

MAX_BODY_BYTES = 64 * 2 ** 20
DEFAULT_QUANTILES = (0.25, 0.5, 0.75)
FORMS = ("texts", "messages", "prompts", "completions")
STOP = object()  # the batching worker's stop signal


class RequestError(ValueError):
    """A request the server refuses: its message goes to the client with HTTP ``status``."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def string_list(payload: dict, key: str, allow_messages: bool = False) -> list:
    """``payload[key]``: a non-empty list of strings (or, with ``allow_messages``, of chat message lists)."""
    items = payload[key]
    if not isinstance(items, list) or not items:
        raise RequestError(f"{key!r} must be a non-empty list")
    for index, item in enumerate(items):
        if not (isinstance(item, str) or allow_messages and isinstance(item, list)):
            kinds = "a string or a chat message list" if allow_messages else "a string"
            raise RequestError(f"{key}[{index}] must be {kinds}, got {type(item).__name__}")
        if isinstance(item, list):
            check_conversation(f"{key}[{index}]", item)
    return items


def check_conversation(name: str, conversation) -> None:
    """A chat message list: a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(conversation, list) or not conversation:
        raise RequestError(f"{name} must be a non-empty list of chat messages")
    for index, message in enumerate(conversation):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise RequestError(f"{name}[{index}] must be a message {{\"role\": str, \"content\": str}}")


def request_sequences(tokenizer, payload) -> list:
    """The token ids (lists of int) a ``/score`` request asks to score, one per item (RequestError when malformed)."""
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(payload) - set(FORMS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}: give 'texts', 'messages', or 'prompts' with 'completions'")
    form = sorted(payload)
    try:
        if form == ["texts"]:
            return tokenizer(string_list(payload, "texts"), add_special_tokens=False)["input_ids"]
        if form == ["messages"]:
            conversations = payload["messages"]
            if not isinstance(conversations, list) or not conversations:
                raise RequestError("'messages' must be a non-empty list of conversations")
            for index, conversation in enumerate(conversations):
                check_conversation(f"messages[{index}]", conversation)
            return [conversation_ids(tokenizer, to_messages(None, conversation)) for conversation in conversations]
        if form == ["completions", "prompts"]:
            prompts = string_list(payload, "prompts", allow_messages=True)
            completions = string_list(payload, "completions")
            if len(prompts) != len(completions):
                raise RequestError(f"'prompts' has {len(prompts)} items and 'completions' {len(completions)}")
            return [conversation_ids(tokenizer, to_messages(prompt, completion))
                    for prompt, completion in zip(prompts, completions)]
    except RequestError:
        raise
    except (ValueError, TemplateError) as error:  # a conversation the library or the chat template refuses
        raise RequestError(str(error)) from None
    raise RequestError("give exactly one of 'texts', 'messages', or 'prompts' with 'completions'")


class BatchScorer:
    """Scores token sequences with a reward model in one worker thread, grouping concurrent submissions.

    ``submit(sequences)`` returns a Future of the columns of :meth:`columns`. The worker takes the first waiting
    submission, adds the ones that arrive within ``max_wait_ms`` while the batch stays within ``max_batch_size``
    sequences, and scores them in one forward (a single submission above ``max_batch_size`` alone, in chunks).
    :meth:`forward_sizes` counts the forwards by size. ``quantiles``: the levels each answer reports;
    ``shaping`` (``alpha``, ``quantile_level``): how ``rewards`` derives from them
    (:func:`distreward.rewards.shape_rewards` with no KL term: the RL framework adds its own).
    """

    def __init__(self, model, pad_token_id: int, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 quantiles: tuple = (), shaping: str = "none", alpha: float = ALPHA,
                 quantile_level: float = QUANTILE_LEVEL):
        check_shaping(shaping, 0.0, alpha, quantile_level=quantile_level)
        for level in quantiles:
            check_level("quantile", level)
        if model.is_scalar and (quantiles or shaping != "none"):
            raise ValueError("a scalar reward model has no distribution: it serves no quantiles and no shaping")
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size} and "
                             f"{max_wait_ms}")
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.pad_token_id, self.max_batch_size, self.max_wait = pad_token_id, max_batch_size, max_wait_ms / 1000
        self.quantiles, self.shaping, self.alpha, self.quantile_level = tuple(quantiles), shaping, alpha, quantile_level
        self.batch_sizes, self.stats_lock = Counter(), threading.Lock()
        self.jobs = queue.Queue()
        self.lock = threading.Lock()
        self.closed = False
        self.worker = threading.Thread(target=self.run, name="distreward-batcher", daemon=True)
        self.worker.start()

    def submit(self, sequences: list) -> Future:
        """Queue ``sequences`` (lists of token ids) for scoring; RequestError 503 once :meth:`close` was called."""
        future = Future()
        with self.lock:
            if self.closed:
                raise RequestError("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            self.jobs.put((sequences, future))
        return future

    def close(self) -> None:
        """Score what was submitted, then stop the worker."""
        with self.lock:
            self.closed = True
            self.jobs.put(STOP)
        self.worker.join()

    def run(self) -> None:
        job = self.jobs.get()
        while job is not STOP:
            batch, job = self.gather(job)
            self.score_batch(batch)
            if job is None:
                job = self.jobs.get()

    def gather(self, first) -> tuple:
        """(the submissions of one batch starting with ``first``, the next one already taken from the queue or None)."""
        batch, size = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is STOP or size + len(job[0]) > self.max_batch_size:
                return batch, job
            batch.append(job)
            size += len(job[0])
        return batch, None

    def score_batch(self, batch: list) -> None:
        """Score the submissions of ``batch`` and settle their futures (each with its own rows, or the error)."""
        sequences = [sequence for job_sequences, _ in batch for sequence in job_sequences]
        try:
            table = torch.cat([self.forward(sequences[start:start + self.max_batch_size])
                               for start in range(0, len(sequences), self.max_batch_size)])
        except Exception as error:  # a failing forward fails its requests (500), never the worker
            for _, future in batch:
                future.set_exception(error)
            return
        start = 0
        for job_sequences, future in batch:
            future.set_result(self.columns(table[start:start + len(job_sequences)]))
            start += len(job_sequences)

    @torch.inference_mode()
    def forward(self, sequences: list) -> torch.Tensor:
        """One reward-model forward -> [N, 3 + len(quantiles)] fp32 on the CPU: reward, mean, std, quantiles."""
        input_ids, attention_mask = padded_batch(sequences, self.pad_token_id)
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        mean, std = output.mean.float(), output.std.float()
        quantiles = [distribution_quantile(output.bin_logits, level, self.model.low, self.model.high)
                     for level in self.quantiles]
        risk = (distribution_quantile(output.bin_logits, self.quantile_level, self.model.low, self.model.high)
                if self.shaping == "quantile" else None)
        reward = shape_rewards(mean, std, torch.zeros_like(mean), self.shaping, beta=0.0, alpha=self.alpha,
                               quantile=risk)
        with self.stats_lock:
            self.batch_sizes[len(sequences)] += 1
        return torch.stack([reward, mean, std, *quantiles], dim=1).cpu()

    def forward_sizes(self) -> Counter:
        """How many forwards scored how many sequences so far: {batch size: forwards}."""
        with self.stats_lock:
            return Counter(self.batch_sizes)

    def columns(self, table: torch.Tensor) -> dict:
        """[N, 3 + Q] rows of :meth:`forward` -> the JSON answer ``{"rewards", "mean", "std", "quantiles"}``."""
        values = table.T.tolist()
        return {"rewards": values[0], "mean": values[1], "std": values[2],
                "quantiles": {str(level): column for level, column in zip(self.quantiles, values[3:])}}


class RewardServer(ThreadingHTTPServer):
    """The HTTP server: routes of :class:`RewardHandler`, sequences scored by ``scorer``.

    ``max_length``: the longest sequence (in tokens) a request may hold (None: no limit). Closing it
    (:meth:`server_close`) waits for the requests in flight.
    """

    daemon_threads = False  # server_close joins the handler threads: answered, not cut off

    def __init__(self, address: tuple, scorer: BatchScorer, tokenizer, max_length: Optional[int], info: dict):
        self.scorer, self.tokenizer, self.max_length, self.info = scorer, tokenizer, max_length, info
        self.tokenizer_lock = threading.Lock()  # a tokenizer is not documented as thread-safe
        super().__init__(address, RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving (call :meth:`serve_forever` from another thread): accept nothing new, answer the requests
        in flight, stop the scorer."""
        self.shutdown()
        self.server_close()
        self.scorer.close()

    def score(self, sequences: list) -> dict:
        """Check the lengths of ``sequences`` and wait for their scores."""
        for index, sequence in enumerate(sequences):
            if not sequence:
                raise RequestError(f"item {index} has no token")
            if self.max_length is not None and len(sequence) > self.max_length:
                raise RequestError(f"item {index} has {len(sequence)} tokens, more than the server's --max_length "
                                   f"{self.max_length}")
        return self.scorer.submit(sequences).result()

    def health(self) -> dict:
        sizes = self.scorer.forward_sizes()
        served = {"forwards": sum(sizes.values()), "sequences": sum(size * count for size, count in sizes.items())}
        return {"status": "ok", **self.info, "served": served}

    def post_score(self, payload) -> dict:
        with self.tokenizer_lock:
            sequences = request_sequences(self.tokenizer, payload)
        return self.score(sequences)

    def post_openrlhf(self, payload) -> dict:
        if not isinstance(payload, dict) or "query" not in payload:
            raise RequestError("an OpenRLHF request is {\"query\": [...], \"prompts\": [...], \"labels\": [...]}")
        return openrlhf_reply(self.post_score({"texts": string_list(payload, "query")}))


POST_ROUTES = {"/score": RewardServer.post_score, "/openrlhf": RewardServer.post_openrlhf}
GET_ROUTES = {"/health": RewardServer.health}


class RewardHandler(BaseHTTPRequestHandler):
    """JSON over HTTP/1.0 (one request per connection); every answer, errors included, is a JSON object."""

    server_version = "distreward"
    timeout = 60  # seconds a client may take to send its request
    error_content_type = "application/json"  # the base class's own errors (a malformed request line)
    error_message_format = '{"error": "%(code)d %(message)s"}'

    def do_GET(self) -> None:
        self.answer(GET_ROUTES, lambda route: route(self.server))

    def do_POST(self) -> None:
        self.answer(POST_ROUTES, lambda route: route(self.server, self.read_json()))

    def answer(self, routes: dict, call) -> None:
        path = urlsplit(self.path).path
        try:
            if path not in routes:
                raise self.no_route(path)
            self.reply(HTTPStatus.OK, call(routes[path]))
        except RequestError as error:
            self.reply(error.status, {"error": str(error)})
        except Exception as error:  # the server's fault, not the request's: say so, log it, keep serving
            traceback.print_exc()
            self.reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}: {error}"})

    def no_route(self, path: str) -> RequestError:
        allowed = [method for method, routes in (("GET", GET_ROUTES), ("POST", POST_ROUTES)) if path in routes]
        if allowed:
            return RequestError(f"{self.command} {path} is not allowed: use {' or '.join(allowed)}",
                                HTTPStatus.METHOD_NOT_ALLOWED)
        routes = [f"{method} {route}" for method, table in (("GET", GET_ROUTES), ("POST", POST_ROUTES))
                  for route in table]
        return RequestError(f"no endpoint {self.command} {path}; the endpoints are {', '.join(routes)}",
                            HTTPStatus.NOT_FOUND)

    def do_other(self) -> None:
        self.answer({}, None)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_other

    def read_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a POST needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
        if not length.isdigit():
            raise RequestError(f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the body has {length} bytes, more than {MAX_BODY_BYTES}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            return json.loads(self.rfile.read(int(length)))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise RequestError(f"malformed JSON: {error}") from None

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code="-", size="-") -> None:
        """Log refused and failed requests only (one stderr line each), not every answer."""
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)


def parse_levels(text: str) -> tuple:
    """``--quantiles``: comma-separated levels in (0, 1), e.g. ``0.1,0.5``; ``""`` for none."""
    try:
        levels = tuple(float(item) for item in text.split(",") if item.strip())
        for level in levels:
            check_level("quantile", level)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser("python -m distreward.serve", (
        "Serve a saved distributional reward model over HTTP: POST /score, POST /openrlhf, GET /health "
        "(docs/integrations.md, 'Reward server')."))
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a reward model directory (the rm stage's output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="most sequences in one reward-model forward")
    parser.add_argument("--max_wait_ms", type=float, default=5.0,
                        help="how long a forward waits for more requests once one arrived")
    parser.add_argument("--quantiles", type=parse_levels, default=None,
                        help="comma-separated quantile levels every answer reports (default 0.25,0.5,0.75; "
                             "none for a scalar reward model)")
    parser.add_argument("--shaping", choices=SHAPINGS, default="none",
                        help="rewards: the mean (none), mean - alpha * std (std_penalty), mean / (std + 1) "
                             "(std_scale) or the --quantile_level quantile (quantile); docs/math.md §5")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="the std_penalty weight")
    parser.add_argument("--quantile_level", type=float, default=QUANTILE_LEVEL, help="the quantile shaping's level")
    parser.add_argument("--max_length", type=int, default=None,
                        help="longest sequence in tokens (default: the backbone's max_position_embeddings)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the reward model's dtype (the head's moments are computed in float32)")
    return parser


def build_server(args: argparse.Namespace) -> RewardServer:
    """Load the model of ``args`` and bind the server (ValueError / OSError with a one-line reason)."""
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {args.max_length}")
    model, tokenizer = load_reward_model(args.model_dir, None)
    if tokenizer is None:
        raise ValueError(f"{args.model_dir} holds no tokenizer (tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {args.model_dir} has no pad token and no EOS token to pad with")
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    quantiles = args.quantiles if args.quantiles is not None else () if model.is_scalar else DEFAULT_QUANTILES
    scorer = BatchScorer(model, tokenizer.pad_token_id, args.max_batch_size, args.max_wait_ms, quantiles,
                         args.shaping, args.alpha, args.quantile_level)
    max_length = args.max_length or getattr(model.backbone.config, "max_position_embeddings", None)
    info = {"model": args.model_dir, "num_bins": model.num_bins, "bin_range": [model.low, model.high],
            "head": "scalar" if model.is_scalar else "distribution", "quantiles": list(quantiles),
            "shaping": args.shaping, "max_batch_size": args.max_batch_size, "max_length": max_length}
    try:
        return RewardServer((args.host, args.port), scorer, tokenizer, max_length, info)
    except OSError:
        scorer.close()
        raise


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    transformers_logging.disable_progress_bar()  # stderr holds an error's one line, stdout the ready line
    try:
        server = build_server(args)
    except Exception as error:  # any failure to load or bind: one line, no traceback
        reason = " ".join(str(error).split()) or type(error).__name__
        print(f"distreward.serve: error: cannot serve {args.model_dir}: {reason}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="distreward-http")
    thread.start()
    print(f"distreward.serve: serving {args.model_dir} on {server.url} (POST /score, POST /openrlhf, GET /health)",
          flush=True)
    stop.wait()
    server.stop()
    thread.join()
    print("distreward.serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
