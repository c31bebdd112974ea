//! `agentd bench http`: the HTTP API's own overhead per request, next to the gRPC figure.
//!
//! One in-process server runs both front ends on one scheduler. The HTTP side sends 1-token
//! chat completions over one keep-alive HTTP/1.1 connection (a minimal client written here,
//! so the client adds as little as possible) and reads the reply's `Server-Timing` header: the
//! overhead is the round trip minus the engine's time (admission to end). It includes
//! everything a stateless request pays besides the engine: reading and checking the JSON,
//! rendering the chat template, tokenizing, opening and closing the request's session, and
//! writing the reply. The gRPC side is `agentd bench serve`'s measurement (1-token
//! generations on one open session, round trip minus the engine's total).

use agentd_engine::LoadedModel;
use agentd_scheduler::{SchedulerConfig, SchedulerHandle};
use agentd_service::http::HttpOptions;
use agentd_service::serve::{spawn_local_with, HttpListen};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One front end's figures, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Overhead {
    /// Requests measured.
    pub iterations: usize,
    /// Client round trip, median.
    pub round_trip_p50_ms: f64,
    /// The engine's time for the request, median.
    pub engine_p50_ms: f64,
    /// Round trip minus engine time, median.
    pub overhead_p50_ms: f64,
    /// Round trip minus engine time, 95th percentile.
    pub overhead_p95_ms: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct HttpBenchReport {
    /// `POST /v1/chat/completions`, `max_tokens: 1`, over one keep-alive connection.
    pub http_chat: Overhead,
    /// `Generate` with `max_tokens: 1` on an open session over the Unix socket.
    pub grpc_generate: Overhead,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn overhead(iterations: usize, trip: &mut [f64], engine: &mut [f64]) -> Overhead {
    let mut over: Vec<f64> = trip.iter().zip(engine.iter()).map(|(t, e)| t - e).collect();
    Overhead {
        iterations,
        round_trip_p50_ms: pct(trip, 0.5),
        engine_p50_ms: pct(engine, 0.5),
        overhead_p50_ms: pct(&mut over.clone(), 0.5),
        overhead_p95_ms: pct(&mut over, 0.95),
    }
}

/// One request on a keep-alive HTTP/1.1 connection: the status, the `server-timing` header
/// and the body.
async fn request(
    conn: &mut BufReader<tokio::net::TcpStream>,
    body: &[u8],
) -> Result<(u16, String, Vec<u8>), BoxError> {
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = conn.get_mut();
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("a malformed status line")?;
    let (mut length, mut timing) = (0usize, String::new());
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse()?,
                "server-timing" => timing = v.trim().to_owned(),
                _ => {}
            }
        }
    }
    let mut out = vec![0; length];
    conn.read_exact(&mut out).await?;
    Ok((status, timing, out))
}

/// A `Server-Timing` metric's duration in milliseconds.
fn timing(header: &str, name: &str) -> Option<f64> {
    header.split(',').find_map(|m| {
        let m = m.trim();
        m.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok()
    })
}

/// Runs `iterations` 1-token requests through each front end.
pub async fn run_http_bench(
    engine: Arc<LoadedModel>,
    sched: SchedulerConfig,
    iterations: usize,
) -> Result<HttpBenchReport, BoxError> {
    let handle = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched.clone())?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let local = spawn_local_with(
        handle,
        engine.clone(),
        Some(HttpListen {
            listener,
            options: HttpOptions::default(),
        }),
    )?;
    let body = serde_json::to_vec(&serde_json::json!({
        "messages": [{"role": "user", "content": "Say one word."}],
        "max_tokens": 1,
        "temperature": 0,
    }))?;
    let mut conn = BufReader::new(tokio::net::TcpStream::connect(addr).await?);
    conn.get_mut().set_nodelay(true)?;
    let (mut trip, mut eng) = (Vec::new(), Vec::new());
    for i in 0..iterations + 5 {
        let start = Instant::now();
        let (status, t, reply) = request(&mut conn, &body).await?;
        let rt = start.elapsed().as_secs_f64() * 1e3;
        if status != 200 {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&reply)).into());
        }
        let e = timing(&t, "engine").ok_or("no server-timing engine figure")?;
        if i >= 5 {
            trip.push(rt);
            eng.push(e);
        }
    }
    let http_chat = overhead(iterations, &mut trip, &mut eng);
    let grpc = super::serve::measure(&local.socket, iterations).await?;
    local.task.abort();
    Ok(HttpBenchReport {
        http_chat,
        grpc_generate: Overhead {
            iterations: grpc.iterations,
            round_trip_p50_ms: grpc.round_trip_p50_ms,
            engine_p50_ms: grpc.engine_p50_ms,
            overhead_p50_ms: grpc.overhead_p50_ms,
            overhead_p95_ms: grpc.overhead_p95_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_timing_durations_are_read_by_name() {
        let h = "queue;dur=1.500, ttft;dur=3.000, engine;dur=2.250, total;dur=3.750";
        assert_eq!(super::timing(h, "engine"), Some(2.25));
        assert_eq!(super::timing(h, "total"), Some(3.75));
        assert_eq!(super::timing(h, "nope"), None);
    }
}
