//! The OpenAI-compatible HTTP API end to end: `agentd serve --http` with the real model, driven
//! over a real TCP socket by a Rust HTTP client (reqwest), and by the official `openai` Python
//! client when python3 has it.

mod common;

use common::{free_loopback_addr, Daemon};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// A daemon with the HTTP API on a free loopback port.
struct Http {
    daemon: Daemon,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Http {
    async fn start(extra: &[&str]) -> Http {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_loopback_addr();
        let mut args = vec!["--http", &addr];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&dir.path().join("s.sock"), &args).await;
        Http {
            daemon,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A streamed request's `data:` payloads (until `[DONE]`, which must end the stream).
    async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        let data: Vec<&str> = text
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// One metric's value (the first sample whose line starts with `prefix`).
    async fn metric(&self, prefix: &str) -> f64 {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}])
}

const SYSTEM: &str = "You are a concise assistant for a weather service. Answer in one short \
sentence. Never make up facts; if you do not know, say so. Use metric units.";

fn chat(user: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// Chunks' content deltas and tool calls (by index: id, name, arguments) put back together.
fn reassemble(chunks: &[Value]) -> (String, Vec<(String, String, String)>, Option<String>) {
    let mut text = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for c in chunks {
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        assert_eq!(c["object"], "chat.completion.chunk");
        let d = &choice["delta"];
        if let Some(t) = d["content"].as_str() {
            text.push_str(t);
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                // The first delta of a call carries its id, type and name.
                assert_eq!(tc["type"], "function");
                calls.push((
                    tc["id"].as_str().unwrap().to_owned(),
                    tc["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            calls[i].2 += tc["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (text, calls, finish)
}

#[tokio::test]
async fn chat_completions_stream_tools_formats_and_the_prefix_cache() {
    let h = Http::start(&["--disk-cache", "0"]).await;
    let (status, health) = h.get("/health").await;
    assert_eq!(status, 200, "{health}");
    // HTTP/2 (cleartext, prior knowledge) on the same port.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(h.url("/health")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );

    // The model's id, which requests may name.
    let (status, models) = h.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let id = models["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(h.get(&format!("/v1/models/{id}")).await.0, 200);

    // Plain chat, then the same request streamed: the same greedy text.
    let mut req = chat("What is the capital of France?", 24);
    req["model"] = json!(id);
    let (status, reply) = h.post("/v1/chat/completions", &req).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    let msg = &reply["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let text = msg["content"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    let u = &reply["usage"];
    let (prompt, completion) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 30 && completion > 0);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(["stop", "length"].contains(&reply["choices"][0]["finish_reason"].as_str().unwrap()));

    // The system prompt (and the question) were cached by the first request.
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = h.stream("/v1/chat/completions", &streamed).await;
    let (again, calls, finish) = reassemble(&chunks);
    assert_eq!(again, text);
    assert!(calls.is_empty());
    assert_eq!(
        finish.as_deref(),
        reply["choices"][0]["finish_reason"].as_str()
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let cached_again = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached_again > cached && cached_again + 1 >= prompt,
        "a repeated prompt is cached but its last token: {cached_again} of {prompt}"
    );
    // Another question after the same system prompt reuses it.
    let (_, other) = h
        .post("/v1/chat/completions", &chat("And of Spain?", 4))
        .await;
    let shared = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(shared >= 30, "the shared system prompt is cached: {other}");

    // Tools: a required call, one at most, constrained to the schema.
    let mut tools = chat("What is the weather in Paris?", 48);
    tools["tools"] = weather_tool();
    tools["tool_choice"] = json!("required");
    tools["parallel_tool_calls"] = json!(false);
    let (status, reply) = h.post("/v1/chat/completions", &tools).await;
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args_text = calls[0]["function"]["arguments"]
        .as_str()
        .unwrap()
        .to_owned();
    let args: Value = serde_json::from_str(&args_text).unwrap();
    assert!(args["city"].is_string(), "{args}");

    // Streamed: the same call, its arguments in pieces.
    let mut st = tools.clone();
    st["stream"] = json!(true);
    let chunks = h.stream("/v1/chat/completions", &st).await;
    let (_, scalls, finish) = reassemble(&chunks);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(scalls.len(), 1);
    assert_eq!(
        (scalls[0].1.as_str(), scalls[0].2.as_str()),
        ("get_weather", args_text.as_str())
    );
    let arg_pieces = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .is_some_and(|a| !a.is_empty())
        })
        .count();
    assert!(arg_pieces > 1, "the arguments stream in pieces");

    // A named function, and the history sent back with the call and its result.
    let mut named = tools.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let (status, reply) = h.post("/v1/chat/completions", &named).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let mut history = tools.clone();
    let call = reply["choices"][0]["message"].clone();
    let call_id = call["tool_calls"][0]["id"].clone();
    history["messages"].as_array_mut().unwrap().extend([
        call,
        json!({"role": "tool", "tool_call_id": call_id, "content": "18 °C, sunny"}),
    ]);
    history["tool_choice"] = json!("none");
    history["max_tokens"] = json!(16);
    let (status, reply) = h.post("/v1/chat/completions", &history).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["choices"][0]["message"]["content"].is_string());
    assert!(reply["choices"][0]["message"].get("tool_calls").is_none());

    // Output formats.
    let mut schema = chat("Give a number between 1 and 9.", 32);
    schema["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
        "additionalProperties": false}}});
    let (status, reply) = h.post("/v1/chat/completions", &schema).await;
    assert_eq!(status, 200, "{reply}");
    let v: Value =
        serde_json::from_str(reply["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(v["n"].is_i64(), "{v}");
    let mut object = chat("Describe Paris as JSON.", 24);
    object["response_format"] = json!({"type": "json_object"});
    let (status, reply) = h.post("/v1/chat/completions", &object).await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    if reply["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object());
    } else {
        assert!(content.starts_with('{'), "{content}");
    }

    // n choices: forks of one session; the prompt counted once.
    let mut three = chat("Name a colour.", 6);
    three["n"] = json!(3);
    three["temperature"] = json!(0.9);
    three["seed"] = json!(5);
    let (status, reply) = h.post("/v1/chat/completions", &three).await;
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let (_, one) = h
        .post("/v1/chat/completions", &chat("Name a colour.", 6))
        .await;
    assert_eq!(
        reply["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let mut st3 = three.clone();
    st3["stream"] = json!(true);
    st3["stream_options"] = json!({"include_usage": true});
    let chunks = h.stream("/v1/chat/completions", &st3).await;
    let mut texts = [String::new(), String::new(), String::new()];
    let mut finished = 0;
    for c in &chunks {
        if let Some(ch) = c["choices"].get(0) {
            let i = ch["index"].as_u64().unwrap() as usize;
            texts[i] += ch["delta"]["content"].as_str().unwrap_or("");
            finished += usize::from(!ch["finish_reason"].is_null());
        }
    }
    assert_eq!(finished, 3);
    // The same seed: the same three replies, streamed or not.
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            t,
            choices[i]["message"]["content"].as_str().unwrap(),
            "choice {i}"
        );
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        reply["usage"]["completion_tokens"]
    );

    // Log-probabilities: the sampled token first among the alternatives (greedy).
    let mut lp = chat("Hi", 4);
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(3);
    let (status, reply) = h.post("/v1/chat/completions", &lp).await;
    assert_eq!(status, 200, "{reply}");
    let entries = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        entries.len() as u64,
        reply["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], e["token"]);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[tokio::test]
async fn completions_ignore_eos_errors_metrics_and_disconnects() {
    let h = Http::start(&[
        "--disk-cache",
        "0",
        "--http-max-body",
        "64KiB",
        "--max-request-tokens",
        "4000",
    ])
    .await;
    let before = h.metric("agentd:prompt_tokens_total{").await;

    // Text completions: text and token prompts, echo, a fixed length with ignore_eos.
    let (status, r) = h
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let text = r["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    let (_, echoed) = h
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "echo": true}),
        )
        .await;
    assert_eq!(
        echoed["choices"][0]["text"],
        format!("Once upon a time{text}")
    );
    let (status, r) = h
        .post(
            "/v1/completions",
            &json!({"prompt": [[9707, 11, 1184]], "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    let fixed = json!({"prompt": "The end.", "max_tokens": 40, "ignore_eos": true, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}, "logprobs": 1});
    let chunks = h.stream("/v1/completions", &fixed).await;
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 40);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|c| &c["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);

    // Each error: OpenAI's shape, the matching status, the parameter named.
    let check = |status: u16, body: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{body}");
        let e = &body["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(e["type"].is_string(), "{body}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}");
        }
    };
    let raw = |body: &'static str| {
        h.client
            .post(h.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
    };
    let r = raw("{\"messages\": [").send().await.unwrap();
    let s = r.status().as_u16();
    check(s, &r.json().await.unwrap(), 400, None);
    for (body, param) in [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 9}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 17}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        // More than the model's context after the prompt.
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9000}),
            "max_tokens",
        ),
    ] {
        let (s, b) = h.post("/v1/chat/completions", &body).await;
        check(s, &b, 400, Some(param));
    }
    let (s, b) = h
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    check(s, &b, 404, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    let r = h.client.get(h.url("/v1/nothing")).send().await.unwrap();
    let s = r.status().as_u16();
    check(s, &r.json().await.unwrap(), 404, None);
    let big = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(70_000)
    );
    let r = h
        .client
        .post(h.url("/v1/chat/completions"))
        .body(big)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    check(s, &r.json().await.unwrap(), 413, None);
    // Over the tenant's tokens-per-request limit: 429, naming the limit.
    let (s, b) = h
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}),
        )
        .await;
    check(s, &b, 429, None);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per request"),
        "{b}"
    );

    // The counters moved.
    let after = h.metric("agentd:prompt_tokens_total{").await;
    assert!(after > before, "{before} → {after}");
    assert!(h.metric("agentd:generation_tokens_total{").await >= 40.0);
    assert!(h.metric("agentd:time_to_first_token_seconds_count{").await >= 4.0);
    assert!(
        h.metric("agentd:request_success_total{finished_reason=\"length\"")
            .await
            >= 1.0
    );
    assert!(h.metric("agentd:prefix_cache_queries_total{").await >= after);

    // A client that goes away mid-stream frees its sequence: far fewer tokens than asked for
    // are generated, and nothing stays running.
    let sdk = agentd_sdk::Client::connect(&h.daemon.socket).await.unwrap();
    let generated_before = sdk.stats().await.unwrap().generated_tokens;
    let long = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "ignore_eos": true, "stream": true});
    let r = h
        .client
        .post(h.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    drop(body);
    let start = Instant::now();
    loop {
        let running = h.metric("agentd:num_requests_running{").await;
        let sessions = h.metric("agentd:num_sessions{").await;
        if running == 0.0 && sessions == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the dropped request is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated = sdk.stats().await.unwrap().generated_tokens - generated_before;
    assert!(
        generated < 1000,
        "{generated} tokens generated after the client left"
    );
}

/// A config file with two tenants' tokens and a metrics token, and the daemon on it.
async fn with_tokens() -> (Http, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agentd.toml");
    std::fs::write(
        &cfg,
        "[tcp.tokens]\n\"alice-token-0123456789\" = \"alice\"\n\"bob-token-0123456789ab\" = \"bob\"\n\
         [http]\nmetrics_token = \"scrape-token-0123456789\"\n",
    )
    .unwrap();
    let h = Http::start(&["--config", cfg.to_str().unwrap(), "--disk-cache", "0"]).await;
    (h, dir)
}

#[tokio::test]
async fn bearer_tokens_name_tenants_and_guard_metrics() {
    let (h, _dir) = with_tokens().await;
    let req = chat("Tell me about Lyon.", 2);
    let send = |token: Option<&str>| {
        let mut b = h.client.post(h.url("/v1/chat/completions")).json(&req);
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        b.send()
    };
    for token in [None, Some("not-a-token")] {
        let r = send(token).await.unwrap();
        assert_eq!(r.status(), 401);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["type"], "authentication_error", "{b}");
    }
    let r = h.client.get(h.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Alice's prompt is cached for Alice, never for Bob.
    let usage = |r: Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let alice = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    assert_eq!(
        usage(alice(send(Some("alice-token-0123456789")).await.unwrap()).await),
        0
    );
    assert!(usage(alice(send(Some("alice-token-0123456789")).await.unwrap()).await) > 0);
    assert_eq!(
        usage(alice(send(Some("bob-token-0123456789ab")).await.unwrap()).await),
        0
    );

    // /metrics needs the scrape token; its tenant labels are the configured names.
    let r = h
        .client
        .get(h.url("/metrics"))
        .bearer_auth("alice-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let text = h
        .client
        .get(h.url("/metrics"))
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("agentd:prompt_tokens_total{model_name=")
            && text.contains("tenant=\"alice\""),
        "{text}"
    );
    assert!(text.contains("tenant=\"bob\""), "{text}");
}

#[tokio::test]
async fn shutdown_drains_streams_and_refuses_new_requests_with_503() {
    let h = Http::start(&["--disk-cache", "0", "--grace-seconds", "60"]).await;
    let long = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 200, "ignore_eos": true, "temperature": 0, "stream": true});
    let r = h
        .client
        .post(h.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    h.daemon.signal(libc::SIGTERM);
    // New requests are refused while the stream drains.
    let start = Instant::now();
    loop {
        let r = h.client.get(h.url("/health")).send().await.unwrap();
        if r.status() == 503 {
            let b: Value = r.json().await.unwrap();
            assert!(b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("shutting down"));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, b) = h.post("/v1/chat/completions", &chat("x", 2)).await;
    assert_eq!(s, 503, "{b}");
    // The running stream still ends normally.
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let out = h.daemon.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The official `openai` Python client against the daemon (chat, streaming, tools, formats,
/// errors): run when python3 can import `openai`, skipped with a note otherwise.
#[tokio::test]
async fn the_official_openai_python_client_works() {
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        eprintln!(
            "skipped: python3 with the `openai` package is not available (pip install openai)"
        );
        return;
    }
    let h = Http::start(&["--disk-cache", "0"]).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/openai/test_openai_client.py"
    );
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", h.base))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

/// `agentd bench http` prints both front ends' overhead as JSON.
#[test]
fn bench_http_reports_http_and_grpc_overhead() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(common::model())
        .args(["bench", "http", "--iterations", "5"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&common::success_stdout(&out).into_bytes()).unwrap();
    for side in ["http_chat", "grpc_generate"] {
        assert_eq!(json[side]["iterations"], 5, "{json}");
        let (trip, engine) = (
            json[side]["round_trip_p50_ms"].as_f64().unwrap(),
            json[side]["engine_p50_ms"].as_f64().unwrap(),
        );
        assert!(trip > 0.0 && engine > 0.0, "{json}");
    }
}
