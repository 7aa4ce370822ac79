"""`refinfer serve`: the OpenAI endpoints over the batching engine, exact under load.

A real uvicorn serves the app in a thread on a free port of 127.0.0.1; clients are the
official `openai` package and httpx. The model is tiny and random with SmolLM2's
vocabulary and chat template, so text goes in and out fast. The oracle for every answer is
`m.generate` of the same prompt and parameters alone: the same text, token count and finish
reason, and log-probabilities equal to the log-softmax of `m.logits` at each position.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refinfer.model import Model, load
from refinfer.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test-5f2c91d0-never-in-logs"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
FINISH = {"eos": "stop", "length": "length"}  # generate's finish reasons -> OpenAI's


@contextmanager
def serving(app) -> Iterator[str]:
    """Run app with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(tiny_speaking_smollm2: Path) -> Model:
    return load(tiny_speaking_smollm2)


@pytest.fixture(scope="module")
def url(model: Model) -> Iterator[str]:
    """The server every test shares: 16 sequences, an API key, a small body limit."""
    app = create_app(model, api_key=KEY, threads=1, max_seqs=16, max_body_bytes=MAX_BODY)
    with serving(app) as base:
        yield base


@pytest.fixture()
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def metrics(http: httpx.Client) -> dict[str, float]:
    """GET /metrics parsed: name -> value."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = [line.split() for line in r.text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum(axis=-1, keepdims=True))


# -- the endpoints -------------------------------------------------------------------------


def test_health_models_and_metrics(http: httpx.Client, url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "numerics": "exact"}  # no key
    (card,) = http.get("/v1/models").json()["data"]
    assert card["id"] == "m" and card["object"] == "model" and card["numerics"] == "exact"
    names = {"requests_running", "requests_waiting", "generation_tokens_per_second",
             "kv_utilisation", "kv_blocks_used_ratio", "prefix_cache_hit_rate",
             "preemptions_total"}  # fmt: skip
    assert {f"refinfer_{n}" for n in names} <= set(metrics(http))


def test_health_and_models_give_the_numerics(tiny_speaking_smollm2: Path) -> None:
    app = create_app(load(tiny_speaking_smollm2, numerics="ggml"), threads=1, max_seqs=1)
    with serving(app) as base:
        assert httpx.get(f"{base}/health").json() == {"status": "ok", "numerics": "ggml"}
        (card,) = httpx.get(f"{base}/v1/models").json()["data"]
    assert card["numerics"] == "ggml"


REQUESTS = [  # (chat?, extra parameters) for 16 concurrent clients
    (i % 2 == 0, p)
    for i, p in enumerate(
        [{"temperature": 0.0}, {"temperature": 0.8, "seed": 1}, {"temperature": 1.0, "seed": 2,
          "top_p": 0.9}, {"temperature": 0.7, "seed": 3, "extra_body": {"top_k": 20}},
         {"temperature": 0.9, "seed": 4, "extra_body": {"min_p": 0.05}},
         {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.3}}] * 3
    )
][:16]  # fmt: skip


def ask(client: openai.OpenAI, i: int) -> dict:
    """Request i of REQUESTS through the openai client: text, finish, tokens, logprobs."""
    chat, params = REQUESTS[i]
    params = dict(params, max_tokens=4 + i % 5, stream=i % 3 == 1)
    if params["stream"]:
        params["stream_options"] = {"include_usage": True}
    if chat:
        if i % 4 == 0:
            params |= {"logprobs": True, "top_logprobs": 3}
        out = client.chat.completions.create(model="m", messages=messages(i), **params)
    else:
        params["logprobs"] = 2 if i % 4 == 1 else None
        out = client.completions.create(model="m", prompt=f"Once upon a time, {i}", **params)
    chunks = list(out) if params["stream"] else [out]
    usage = chunks[-1].usage
    choices = [c for chunk in chunks for c in chunk.choices]
    text = "".join((c.delta.content or "") if params["stream"] and chat else
                   (c.message.content if chat else c.text) for c in choices)  # fmt: skip
    logprobs = [c.logprobs for c in choices if c.logprobs]
    if chat:
        logprobs = [(t.token, t.logprob) for lp in logprobs for t in lp.content]
    else:
        logprobs = [p for lp in logprobs for p in zip(lp.tokens, lp.token_logprobs, strict=True)]
    return {"text": text, "finish": choices[-1].finish_reason, "n": usage.completion_tokens,
            "logprobs": logprobs}  # fmt: skip


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a terse assistant who names rivers."},
            {"role": "user", "content": f"Question {i}: name a river."}]  # fmt: skip


def solo(m: Model, i: int) -> tuple[list[int], object]:
    """Request i run alone with m.generate: (prompt ids, Generation)."""
    chat, params = REQUESTS[i]
    sampling = {k: v for k, v in params.items() if k != "extra_body"} | params.get("extra_body", {})
    tok = m.tokenizer
    if chat:
        prompt = tok.encode(tok.apply_chat_template(messages(i)), parse_special=True)
    else:
        prompt = tok.encode(f"Once upon a time, {i}")
    return prompt, m.generate(prompt, max_new_tokens=4 + i % 5, **sampling)


def test_16_concurrent_clients_each_get_exactly_their_solo_tokens(url: str, model: Model) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(client, i), range(16)))
    for i, got in enumerate(answers):
        prompt, want = solo(model, i)
        assert (got["text"], got["finish"], got["n"]) == (
            want.text, FINISH[want.finish_reason], len(want.ids)
        ), i  # fmt: skip
        if got["logprobs"]:
            rows = log_softmax(model.logits(prompt + want.ids[:-1])[len(prompt) - 1 :])
            expected = [(model.tokenizer.decode([t], special=True), rows[k, t])
                        for k, t in enumerate(want.ids)]  # fmt: skip
            assert [t for t, _ in got["logprobs"]] == [t for t, _ in expected], i
            np.testing.assert_allclose([v for _, v in got["logprobs"]],
                                       [v for _, v in expected], rtol=0, atol=1e-12)  # fmt: skip


def test_stream_is_openai_server_sent_events(http: httpx.Client) -> None:
    body = {"messages": messages(0), "max_tokens": 6, "temperature": 0}
    whole = http.post("/v1/chat/completions", json=body).json()
    stream = body | {"stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=stream) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"]
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_cut_the_text(http: httpx.Client) -> None:
    body = {"prompt": "The river", "max_tokens": 12, "temperature": 0}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 :][:3]
    cut = http.post("/v1/completions", json=body | {"stop": ["@@", stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(stop)]


def test_a_shared_prefix_is_served_from_the_cache(http: httpx.Client) -> None:
    system = {"role": "system", "content": "Rivers of Europe, from west to east. " * 6}
    for question in ("Which is longest?", "Which is widest?"):
        body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 1}
        usage = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 48  # the system prompt's blocks


# -- under load ----------------------------------------------------------------------------


def test_a_disconnected_stream_is_cancelled_and_frees_its_blocks(http: httpx.Client) -> None:
    before = metrics(http)["refinfer_generation_tokens_total"]
    body = {"prompt": "A long story:", "max_tokens": 200, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        next(line for line in r.iter_lines() if line)  # the first chunk: it is running
    deadline = time.monotonic() + 30
    while (m := metrics(http))["refinfer_requests_in_flight"] or m["refinfer_requests_running"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["refinfer_kv_blocks_used_ratio"] == 0
    assert m["refinfer_generation_tokens_total"] - before < 200  # stopped early
    ok = http.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_full_server_answers_503(model: Model) -> None:
    app = create_app(model, threads=1, max_seqs=1, max_queue=1)  # holds 2 requests
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        body = {"prompt": "Once", "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(6)))
        busy = [a for a in answers if a.status_code == 503]
        assert busy and len(busy) < 6, [a.status_code for a in answers]
        assert {a.json()["error"]["type"] for a in busy} == {"server_busy"}
        assert all(a.status_code == 200 for a in answers if a not in busy)
        assert metrics(client)["refinfer_requests_rejected_total"] == len(busy)


# -- bad input -----------------------------------------------------------------------------

CONTEXT = 256  # the tiny model's
BAD = [  # (path, body, status, part of the message)
    ("/v1/completions", b"{'prompt': ", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt: Input should be"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n: Input should be 1"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 1}, 400, "presence_penalty: Extra"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "a", "max_tokens": CONTEXT}, 400, "exceed the model's context"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "not served here"),
    ("/v1/completions", {"prompt": "a" * MAX_BODY}, 413, "body is over"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: List should have at least"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}, 400,
     "exceed the model's context"),
    ("/v1/nothing", {}, 404, "Not Found"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD)
def test_bad_requests_get_openai_errors(http: httpx.Client, path, body, status, message) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"], error
    assert error["type"] and "Traceback" not in r.text


def test_the_api_key_is_needed_compared_in_constant_time_and_never_logged(
    url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or compare(a, b))
    caplog.set_level(logging.DEBUG)
    body = {"prompt": "a", "max_tokens": 1}
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                            ({"Authorization": KEY}, 401), (AUTH, 200)]:  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401 and len(compared) >= 5
    assert "POST /v1/completions" in caplog.text and KEY not in caplog.text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)  # fmt: skip
FIELDS = ["model", "prompt", "messages", "temperature", "top_p", "top_k", "seed", "stop",
          "stream", "logprobs", "top_logprobs", "min_p", "repetition_penalty", "n"]  # fmt: skip
BODIES = st.one_of(
    st.binary(max_size=64),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"max_tokens": st.integers(-1, 3) | st.text(max_size=2)},  # short, when it runs
        optional={f: JSON for f in FIELDS} | {"prompt": st.text(max_size=20),
                                              "messages": st.just(messages(0))},
    ).map(lambda d: json.dumps(d).encode()),
)  # fmt: skip


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=BODIES)
def test_random_bodies_get_4xx_or_an_answer_and_never_break_it(http, path, body) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404), r.text
    assert r.status_code == 200 or "\n" not in r.json()["error"]["message"]
    ok = http.post("/v1/completions", json={"prompt": "Fine?", "max_tokens": 1})
    assert ok.status_code == 200
