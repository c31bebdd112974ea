//! `agentd bench serve`: the daemon's own overhead. The real service runs on a temporary Unix
//! socket in this process and the SDK client sends 1-token generations to it; the overhead of
//! each is the client's round trip minus the engine's own time for the request (from the
//! moment the engine thread queued it to the end, as its usage reports).

use crate::generate::Engine;
use crate::scheduler::{EngineHandle, SchedulerConfig};
use crate::service::serve::spawn_local;
use agentd_sdk::{Client, Event, GenerateOptions};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::StreamExt;

/// The report.
#[derive(Debug, Serialize)]
pub struct ServeBenchReport {
    /// 1-token generations measured.
    pub iterations: usize,
    /// Client round trip (send → last event), median, milliseconds.
    pub round_trip_p50_ms: f64,
    /// The engine's time for the request, median, milliseconds.
    pub engine_p50_ms: f64,
    /// Round trip minus engine time, median, milliseconds.
    pub overhead_p50_ms: f64,
    /// Round trip minus engine time, 95th percentile, milliseconds.
    pub overhead_p95_ms: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Runs `iterations` 1-token generations through the socket.
pub async fn run_serve_bench(
    engine: Arc<Engine>,
    sched: SchedulerConfig,
    iterations: usize,
) -> Result<ServeBenchReport, Box<dyn std::error::Error + Send + Sync>> {
    let handle = EngineHandle::spawn(engine.clone(), sched)?;
    let local = spawn_local(handle)?;
    let (socket, server) = (&local.socket, &local.task);
    let client = Client::connect(&socket).await?;
    let prompt = client
        .tokenize(
            "<|im_start|>user\nSay one word.<|im_end|>\n<|im_start|>assistant\n",
            true,
        )
        .await?;
    let session = client.create_session(None, prompt).await?;
    let opts = GenerateOptions::greedy().max_tokens(1);
    let (mut trip, mut eng, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations + 5 {
        let start = Instant::now();
        let mut stream = session.generate(&opts).await?;
        let mut engine_s = None;
        while let Some(ev) = stream.next().await {
            if let Event::Done(u) = ev? {
                engine_s = Some(u.total_seconds);
            }
        }
        let rt = start.elapsed().as_secs_f64();
        let e = engine_s.ok_or("no usage")?;
        if i >= 5 {
            trip.push(rt * 1e3);
            eng.push(e * 1e3);
            over.push((rt - e) * 1e3);
        }
    }
    server.abort();
    Ok(ServeBenchReport {
        iterations,
        round_trip_p50_ms: pct(&mut trip, 0.5),
        engine_p50_ms: pct(&mut eng, 0.5),
        overhead_p50_ms: pct(&mut over.clone(), 0.5),
        overhead_p95_ms: pct(&mut over, 0.95),
    })
}
