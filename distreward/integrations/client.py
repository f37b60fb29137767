"""The HTTP client of the reward server (:mod:`distreward.serve`), shared by the OpenRLHF and verl plugins.

Standard library only (``urllib``), so a plugin loads no model and no transformers in the trainer's process.
The server's address comes from the argument or the environment variable ``DISTREWARD_SERVER_URL``
(e.g. ``http://127.0.0.1:8000``).
"""
import json
import os
import time
import urllib.error
import urllib.request
from typing import Optional

SERVER_URL_ENV = "DISTREWARD_SERVER_URL"


def server_url(url: Optional[str] = None) -> str:
    """``url``, else ``$DISTREWARD_SERVER_URL``, without a trailing slash (ValueError when neither is set)."""
    url = url or os.environ.get(SERVER_URL_ENV)
    if not url:
        raise ValueError(f"no reward server address: set {SERVER_URL_ENV} (e.g. http://127.0.0.1:8000), the URL "
                         f"`python -m distreward.serve MODEL_DIR` prints when ready")
    return url.rstrip("/")


def post_json(url: str, payload: dict, timeout: float = 300.0, retries: int = 3, retry_wait: float = 1.0) -> dict:
    """POST ``payload`` as JSON to ``url`` and return the decoded JSON answer.

    A server that cannot be reached (or answers 503 while it shuts down) is tried ``retries`` more times,
    ``retry_wait`` seconds apart; any other HTTP error raises RuntimeError with the server's ``error`` message.
    """
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == retries:
                raise RuntimeError(f"reward server {url} answered {error.code}: {error_message(error)}") from None
        except urllib.error.URLError as error:
            if attempt == retries:
                raise RuntimeError(f"reward server {url} unreachable: {error.reason}") from None
        time.sleep(retry_wait)


def error_message(error: urllib.error.HTTPError) -> str:
    """The ``error`` field of a JSON error answer, else its raw body."""
    body = error.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body


def score(payload: dict, url: Optional[str] = None, **kwargs) -> dict:
    """``POST {server}/score`` (schema: docs/integrations.md, "Reward server") -> ``{"rewards", "mean", "std",
    "quantiles"}``; ``kwargs`` go to :func:`post_json`."""
    return post_json(f"{server_url(url)}/score", payload, **kwargs)
