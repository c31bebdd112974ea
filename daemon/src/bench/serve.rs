//! `agentd bench serve`: the daemon's own overhead. The real service runs on a temporary Unix
//! socket in this process and a gRPC client sends 1-token generations to it; the overhead of
//! each is the client's round trip minus the engine's own time for the request (from the
//! moment the engine thread queued it to the end, as its usage reports).

use crate::cli::connect::connect;
use agentd_engine::LoadedModel;
use agentd_scheduler::{SchedulerConfig, SchedulerHandle};
use agentd_service::serve::spawn_local;
use agentd_wire::proto::{self, generate_event};
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
    engine: Arc<LoadedModel>,
    sched: SchedulerConfig,
    iterations: usize,
) -> Result<ServeBenchReport, Box<dyn std::error::Error + Send + Sync>> {
    let handle = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched)?;
    let local = spawn_local(handle, engine)?;
    let report = measure(&local.socket, iterations).await;
    local.task.abort();
    report
}

/// The measurement against a server already listening on `socket`.
pub async fn measure(
    socket: &std::path::Path,
    iterations: usize,
) -> Result<ServeBenchReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut client = connect(socket).await?;
    let prompt = client
        .tokenize(proto::TokenizeRequest {
            text: "<|im_start|>user\nSay one word.<|im_end|>\n<|im_start|>assistant\n".into(),
            parse_special: true,
        })
        .await?
        .into_inner()
        .tokens;
    let session_id = client
        .create_session(proto::CreateSessionRequest {
            prefix_id: 0,
            tokens: prompt,
        })
        .await?
        .into_inner()
        .session_id;
    let req = proto::GenerateRequest {
        session_id,
        max_tokens: 1,
        // Temperature 0: greedy.
        sampling: Some(proto::Sampling::default()),
        ..Default::default()
    };
    let (mut trip, mut eng, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations + 5 {
        let start = Instant::now();
        let mut stream = client.generate(req.clone()).await?.into_inner();
        let mut engine_s = None;
        while let Some(ev) = stream.next().await {
            if let Some(generate_event::Event::Done(u)) = ev?.event {
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
    Ok(ServeBenchReport {
        iterations,
        round_trip_p50_ms: pct(&mut trip, 0.5),
        engine_p50_ms: pct(&mut eng, 0.5),
        overhead_p50_ms: pct(&mut over.clone(), 0.5),
        overhead_p95_ms: pct(&mut over, 0.95),
    })
}
