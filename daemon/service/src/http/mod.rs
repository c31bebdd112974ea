//! The OpenAI-compatible HTTP API and the Prometheus endpoint, on the daemon's own runtime and
//! engine (`agentd serve --http ADDR`): HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on one
//! port, through axum (already in the tree under tonic).
//!
//! - `GET /v1/models`, `GET /v1/models/{id}`: the model this daemon serves.
//! - `POST /v1/chat/completions`, `POST /v1/completions`: stateless requests, each a session
//!   of its own that is closed when the reply ends or the client goes away; their prompts share
//!   cached prefixes through the radix tree like sessions do (`cached_tokens` in the usage).
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]); `GET /health`: 200, or 503 while
//!   shutting down.
//!
//! Tenancy as on the TCP listener: with `[tcp.tokens]` configured, a bearer token names the
//! tenant and a missing or unknown one is 401; without tokens every caller is tenant 0 (and the
//! listener is on loopback unless the operator says otherwise). Errors are OpenAI's JSON
//! ([`error::ApiError`]). Each request gets a `tracing` span with a request id.

pub mod error;
mod generate;
pub mod params;
pub mod toolcalls;

use crate::AgentdService;
use agentd_scheduler::TenantId;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::Instrument;

/// The default limit on a request body (`--http-max-body`).
pub const DEFAULT_MAX_BODY: usize = 8 << 20;

/// How the HTTP listener behaves.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The largest request body accepted, in bytes (413 past it).
    pub max_body: usize,
    /// The bearer token `/metrics` needs, if any. Without one, `/metrics` is open on a daemon
    /// with no tenant tokens and refused (403) on one with them, whose figures are every
    /// tenant's.
    pub metrics_token: Option<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            metrics_token: None,
        }
    }
}

/// What every handler shares.
pub struct HttpState {
    svc: Arc<AgentdService>,
    opts: HttpOptions,
    /// Set when the daemon starts shutting down: new requests get 503.
    closing: Arc<AtomicBool>,
    /// Generations running for HTTP clients: after a shutdown signal, the listener stays
    /// open (answering 503, so load balancers see the drain) until they end.
    inflight: Arc<std::sync::atomic::AtomicUsize>,
    /// When the daemon started (the model's `created`).
    started: u64,
}

impl HttpState {
    /// The state for `svc`'s HTTP API; `closing` is set when shutdown starts.
    pub fn new(svc: Arc<AgentdService>, opts: HttpOptions, closing: Arc<AtomicBool>) -> Self {
        Self {
            svc,
            opts,
            closing,
            inflight: Default::default(),
            started: unix_now(),
        }
    }

    /// Resolves once shutdown has started (`stopped`) and no HTTP generation is running: when
    /// the listener may close.
    pub async fn drained(&self, stopped: impl std::future::Future<Output = ()>) {
        stopped.await;
        while self.inflight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The caller's tenant from its bearer token (any caller is tenant 0 when the daemon has
    /// no tokens).
    fn tenant(&self, headers: &HeaderMap) -> Result<TenantId, ApiError> {
        let span = tracing::Span::current();
        let tenant = if self.svc.access.tokens.is_empty() {
            0
        } else {
            let token = bearer(headers)?;
            *self
                .svc
                .access
                .tokens
                .get(token)
                .ok_or_else(|| ApiError::unauthorized("unknown bearer token"))?
        };
        span.record("tenant", tenant);
        Ok(tenant)
    }

    /// Checks a request's `model` against the one served (absent: the one served).
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if self.svc.model_names.iter().any(|n| n == m) => Ok(()),
            Some(m) => Err(ApiError::unknown_model(m, self.model_id())),
        }
    }

    fn model_id(&self) -> &str {
        &self.svc.model_names[0]
    }

    /// The body as JSON, within the size limit.
    async fn json(&self, headers: &HeaderMap, body: Body) -> Result<serde_json::Value, ApiError> {
        let limit = self.opts.max_body;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
            // The only error past the limit is the limit's; others are the connection's.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }
}

/// `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let h = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>`"))?;
    h.to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not `Bearer <token>`"))
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes over `state`.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_span,
        ))
        .with_state(state)
}

/// Every request: a span with a request id, and 503 once shutdown has started.
async fn request_span(State(st): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        request = %crate::status::request_id(),
        tenant = tracing::field::Empty,
        user = tracing::field::Empty,
    );
    if st.closing.load(Ordering::Relaxed) {
        return ApiError::shutting_down().into_response();
    }
    next.run(req).instrument(span).await
}

async fn no_route(req: Request) -> ApiError {
    ApiError::no_route(format!(
        "no route {} {}",
        req.method(),
        crate::status::cap(req.uri().path())
    ))
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{} is not allowed on {}",
        req.method(),
        crate::status::cap(req.uri().path())
    ))
}

fn model_card(st: &HttpState) -> serde_json::Value {
    serde_json::json!({
        "id": st.model_id(),
        "object": "model",
        "created": st.started,
        "owned_by": "agentd",
        "root": st.model_id(),
        "parent": null,
        "max_model_len": st.svc.model.model.config().context_length,
    })
}

async fn list_models(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.tenant(&headers)?;
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": [model_card(&st)],
    })))
}

async fn get_model(
    State(st): State<Arc<HttpState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.tenant(&headers)?;
    st.check_model(Some(&id))?;
    Ok(Json(model_card(&st)))
}

async fn health(State(st): State<Arc<HttpState>>) -> Response {
    // Checked by the middleware too; kept here so the answer never depends on layering.
    if st.closing.load(Ordering::Relaxed) {
        return ApiError::shutting_down().into_response();
    }
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn metrics(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match &st.opts.metrics_token {
        Some(want) if bearer(&headers)? != want => {
            return Err(ApiError::unauthorized("unknown bearer token for /metrics"));
        }
        Some(_) => {}
        None if !st.svc.access.tokens.is_empty() => {
            return Err(ApiError::forbidden(
                "this daemon has tenant tokens, so its metrics (every tenant's) need [http] metrics_token",
            ))
        }
        None => {}
    }
    let stats = st
        .svc
        .sched
        .stats()
        .await
        .map_err(|e| ApiError::from(crate::status::to_status(e)))?;
    let text = st.svc.metrics.render(&stats);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}
