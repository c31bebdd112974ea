#!/usr/bin/env python3
"""Drives a running agentd HTTP server with the official `openai` Python client.

    python3 tests/openai/test_openai_client.py http://127.0.0.1:8080/v1

Start the daemon first, e.g. `agentd serve --http 127.0.0.1:8080` (no [tcp.tokens]: any API
key is accepted). Needs `pip install openai`; no pytest. Every check prints `ok NAME` or
`FAIL NAME: why`, and the last line is exactly `N passed, M failed` (CI reads it); the exit
status is non-zero when a check failed.

The default model (SmolLM2-135M) is tiny, so the checks are about the API's structure and the
constraints the daemon enforces (tool calls, JSON), never about what the model knows. Every
request is greedy (temperature 0) with a small max_tokens so the whole run stays well under a
minute on two cores.
"""

import json
import sys
import time
import traceback
import urllib.request

try:
    import openai
except ImportError:  # pragma: no cover - environment problem, reported plainly
    print("the `openai` package is missing: pip install openai", file=sys.stderr)
    print("0 passed, 1 failed")
    sys.exit(2)

PASSED = 0
FAILED = 0
CHECKS = []


def check(fn):
    """Registers a check; it runs in definition order."""
    CHECKS.append(fn)
    return fn


def run_checks(ctx):
    global PASSED, FAILED
    for fn in CHECKS:
        name = fn.__name__.removeprefix("check_")
        t0 = time.monotonic()
        try:
            fn(ctx)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            FAILED += 1
            # The last line of this script the failure passed through.
            lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
            why = f"{type(e).__name__}: {e}".strip()
            print(f"FAIL {name}: {why} (line {lines[-1] if lines else '?'})", flush=True)
        else:
            PASSED += 1
            print(f"ok {name} ({time.monotonic() - t0:.1f}s)", flush=True)


class Ctx:
    def __init__(self, base_url):
        self.base_url = base_url.rstrip("/")
        # The server's root (for /metrics and /health), BASE_URL without its /v1.
        self.root = self.base_url.removesuffix("/v1")
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key="agentd",  # any string: a daemon without [tcp.tokens] takes every caller
            max_retries=0,  # a retried 5xx would hide a server bug
            timeout=60,
        )
        self.model = None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}

WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Use the tools you are given."},
    {"role": "user", "content": "What is the weather like in Paris right now?"},
]

# A system prompt long enough to fill several KV pages, so a second request sharing it finds
# it in the prefix cache.
LONG_SYSTEM = (
    "You are the support assistant of a small bicycle shop in Lyon. "
    "The shop repairs city bikes, road bikes and cargo bikes, sells spare parts and rents "
    "electric bikes by the day or the week. Opening hours are Tuesday to Saturday, nine to "
    "seven, closed on Sundays, Mondays and public holidays. Repairs are booked online or at "
    "the counter; a standard service costs sixty euros and takes two working days. "
    "Always answer briefly and politely, in the customer's language, and never promise a "
    "repair date before a mechanic has looked at the bike. "
) * 3


def chat(ctx, **kw):
    kw.setdefault("model", ctx.model)
    kw.setdefault("temperature", 0)
    return ctx.client.chat.completions.create(**kw)


def assert_one_weather_call(choice):
    assert choice.finish_reason == "tool_calls", choice.finish_reason
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1, calls
    call = calls[0]
    assert call.type == "function", call.type
    assert call.id, call
    assert call.function.name == "get_weather", call.function.name
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict), args
    assert isinstance(args.get("city"), str), args
    return call


# ---------------------------------------------------------------------------------------------


@check
def check_health(ctx):
    with urllib.request.urlopen(ctx.root + "/health", timeout=10) as r:
        assert r.status == 200, r.status
        assert json.load(r) == {"status": "ok"}


@check
def check_models_list(ctx):
    models = ctx.client.models.list().data
    assert len(models) == 1, models
    m = models[0]
    assert m.object == "model" and isinstance(m.id, str) and m.id, m
    ctx.model = m.id
    assert ctx.client.models.retrieve(m.id).id == m.id


@check
def check_chat_basic(ctx):
    r = chat(ctx, messages=[{"role": "user", "content": "Say hello in one short sentence."}], max_tokens=16)
    assert r.object == "chat.completion", r.object
    assert r.model == ctx.model, r.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content.strip(), c.message.content
    assert not c.message.tool_calls
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0, u
    assert u.completion_tokens <= 16, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u


@check
def check_prefix_cache_cached_tokens(ctx):
    def ask(q):
        return chat(
            ctx,
            messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": q}],
            max_tokens=8,
        )

    first = ask("Are you open on Monday?")
    second = ask("How much is a standard service?")
    assert first.usage.prompt_tokens > 200, first.usage
    details = second.usage.prompt_tokens_details
    assert details is not None, second.usage
    assert details.cached_tokens > 0, second.usage
    assert details.cached_tokens <= second.usage.prompt_tokens, second.usage


@check
def check_chat_streaming_matches_greedy(ctx):
    params = dict(
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=24,
    )
    whole = chat(ctx, **params)
    expected = whole.choices[0].message.content
    stream = chat(ctx, stream=True, stream_options={"include_usage": True}, **params)
    chunks = list(stream)
    assert len(chunks) >= 3, chunks
    text = ""
    finish = None
    for ch in chunks[:-1]:
        assert ch.object == "chat.completion.chunk", ch.object
        assert ch.id == chunks[0].id
        assert len(ch.choices) == 1, ch
        assert ch.usage is None, ch.usage
        d = ch.choices[0].delta
        text += d.content or ""
        if ch.choices[0].finish_reason is not None:
            finish = ch.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == expected, (text, expected)
    assert finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason)
    last = chunks[-1]
    assert last.choices == [], last.choices
    assert last.usage is not None, last
    assert last.usage.completion_tokens == whole.usage.completion_tokens, (last.usage, whole.usage)
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens, (last.usage, whole.usage)


@check
def check_tools_required(ctx):
    r = chat(
        ctx,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
    )
    assert_one_weather_call(r.choices[0])


@check
def check_tools_named_choice(ctx):
    r = chat(
        ctx,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=40,
    )
    assert_one_weather_call(r.choices[0])


@check
def check_tools_streaming(ctx):
    params = dict(
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
    )
    whole = assert_one_weather_call(chat(ctx, **params).choices[0])
    calls = {}  # index → {"id", "name", "arguments"}
    finish = None
    for ch in chat(ctx, stream=True, **params):
        if not ch.choices:
            continue
        c = ch.choices[0]
        if c.finish_reason is not None:
            finish = c.finish_reason
        for tc in c.delta.tool_calls or []:
            if tc.index not in calls:
                # The first delta of a call carries its id, type and name.
                assert tc.id and tc.function and tc.function.name, tc
                assert tc.type == "function", tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None or tc.id == calls[tc.index]["id"], tc
            if tc.function and tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
    assert finish == "tool_calls", finish
    assert list(calls) == [0], calls
    call = calls[0]
    assert call["name"] == "get_weather", call
    args = json.loads(call["arguments"])
    assert isinstance(args.get("city"), str), args
    # Greedy: the streamed call is the one the whole reply made.
    assert args == json.loads(whole.function.arguments), (args, whole.function.arguments)


@check
def check_tools_round_trip(ctx):
    r = chat(
        ctx,
        messages=WEATHER_MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=40,
    )
    call = assert_one_weather_call(r.choices[0])
    history = WEATHER_MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    r2 = chat(ctx, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=24)
    c = r2.choices[0]
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert not c.message.tool_calls, c.message.tool_calls
    assert isinstance(c.message.content, str) and c.message.content.strip(), c.message.content
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens - 200, r2.usage


@check
def check_response_format_json_object(ctx):
    r = chat(
        ctx,
        messages=[
            {"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": "Give a JSON object describing a cat with a name and an age."},
        ],
        response_format={"type": "json_object"},
        max_tokens=40,
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
    value = json.loads(c.message.content)
    assert isinstance(value, dict), value


@check
def check_response_format_json_schema(ctx):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": False,
    }
    r = chat(
        ctx,
        messages=[{"role": "user", "content": "Describe a cat called Tom who is 3 years old, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        max_tokens=40,
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.message.content)
    value = json.loads(c.message.content)
    assert isinstance(value, dict), value
    assert isinstance(value.get("age"), int) and not isinstance(value["age"], bool), value
    assert set(value) <= {"name", "age"}, value


@check
def check_completions(ctx):
    r = ctx.client.completions.create(
        model=ctx.model, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion", r.object
    c = r.choices[0]
    assert isinstance(c.text, str) and c.text, c.text
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert 0 < r.usage.completion_tokens <= 5, r.usage
    assert r.usage.prompt_tokens > 0, r.usage


@check
def check_completions_ignore_eos(ctx):
    r = ctx.client.completions.create(
        model=ctx.model,
        prompt="Hello.",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert r.usage.completion_tokens == 12, r.usage
    assert c.finish_reason == "length", c.finish_reason


@check
def check_chat_logprobs(ctx):
    r = chat(
        ctx,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    c = r.choices[0]
    assert c.logprobs is not None and c.logprobs.content, c.logprobs
    entries = c.logprobs.content
    assert len(entries) <= r.usage.completion_tokens, (len(entries), r.usage)
    assert len(entries) >= r.usage.completion_tokens - 1, (len(entries), r.usage)
    for e in entries:
        assert isinstance(e.token, str), e
        assert e.logprob <= 0, e
        assert len(e.top_logprobs) == 2, e.top_logprobs
        for t in e.top_logprobs:
            assert t.logprob <= 0, t
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob, e.top_logprobs
        # Greedy: the chosen token is the most likely one.
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4, e
    # The tokens' bytes spell the reply (stop tokens are in neither).
    spelled = b"".join(bytes(e.bytes or b"") for e in entries).decode("utf-8", "replace")
    assert spelled == c.message.content, (spelled, c.message.content)


def expect_error(cls, param, **kw):
    try:
        kw.setdefault("messages", [{"role": "user", "content": "hi"}])
        kw.setdefault("max_tokens", 4)
        CTX.client.chat.completions.create(**kw)
    except cls as e:
        text = json.dumps(e.body) + " " + e.message
        assert param in text, f"{param!r} not named in {text}"
        return e
    raise AssertionError(f"no {cls.__name__} for {kw}")


@check
def check_error_unknown_model(ctx):
    e = expect_error(openai.NotFoundError, "no-such-model", model="no-such-model")
    assert e.status_code == 404, e.status_code
    assert e.code == "model_not_found", e.code


@check
def check_error_n(ctx):
    e = expect_error(openai.BadRequestError, "n", model=ctx.model, n=17)
    assert e.param == "n", e.param


@check
def check_n_choices(ctx):
    r = ctx.client.chat.completions.create(
        model=ctx.model,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=3,
        temperature=0.9,
        seed=11,
        max_tokens=8,
    )
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert r.usage.completion_tokens >= 3, r.usage


@check
def check_error_temperature(ctx):
    e = expect_error(openai.BadRequestError, "temperature", model=ctx.model, temperature=5)
    assert e.param == "temperature", e.param


@check
def check_metrics(ctx):
    # Last, so the requests above have been counted (a labelled counter appears only once it
    # has a value).
    with urllib.request.urlopen(ctx.root + "/metrics", timeout=10) as r:
        assert r.status == 200, r.status
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    for name in (
        "agentd:prompt_tokens_total",
        "agentd:generation_tokens_total",
        "agentd:request_success_total",
        "agentd:time_to_first_token_seconds_count",
        "agentd:e2e_request_latency_seconds_count",
    ):
        assert values.get(name, 0) > 0, f"{name} missing or 0 in /metrics"
    for name in ("agentd:kv_cache_usage_perc", "agentd:kv_cache_pages", "agentd:num_preemptions_total"):
        assert name in values, f"{name} missing in /metrics"
    assert values.get("agentd:prefix_cache_hits_total", 0) > 0, "no prefix cache hits counted"


CTX = None


def main(argv):
    global CTX
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    CTX = Ctx(argv[1])
    t0 = time.monotonic()
    run_checks(CTX)
    print(f"# {time.monotonic() - t0:.1f}s, openai {openai.__version__}", flush=True)
    print(f"{PASSED} passed, {FAILED} failed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
