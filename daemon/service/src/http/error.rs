//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! that matches (400 a bad parameter, naming it; 401; 404; 413; 429 a tenant limit; 503 while
//! shutting down; 500 with the detail logged).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// One refusal of an HTTP request.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`…).
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`…).
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: crate::status::cap(&message.into()),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: parameter `param` is wrong.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{param}: {}", message.into()),
        );
        e.param = Some(param);
        e
    }

    /// 400 without a single parameter to blame.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    /// 404 for a path or method this server does not have.
    pub fn no_route(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        e.code = Some("not_found");
        e
    }

    /// 404 for a model this daemon does not serve.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model {:?} does not exist here; this daemon serves {served:?} (GET /v1/models)",
                crate::status::cap(model)
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 405.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            message,
        )
    }

    /// 413: the body is over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        e
    }

    /// 503 while the daemon shuts down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the daemon is shutting down",
        )
    }

    /// The HTTP form of a gRPC-style status from the shared request checks and the scheduler.
    pub fn from_status(s: &tonic::Status) -> Self {
        let msg = s.message().to_owned();
        let mut e = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition => Self::bad_request(msg),
            Code::OutOfRange => {
                let mut e = Self::bad_request(msg);
                e.code = Some("context_length_exceeded");
                e
            }
            Code::NotFound => Self::new(StatusCode::NOT_FOUND, "invalid_request_error", msg),
            Code::ResourceExhausted => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", msg);
                e.code = Some("rate_limit_exceeded");
                e
            }
            Code::Unauthenticated => Self::unauthorized(msg),
            Code::PermissionDenied => Self::forbidden(msg),
            Code::Unavailable => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", msg)
            }
            Code::Cancelled => Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg),
        };
        if e.status == StatusCode::INTERNAL_SERVER_ERROR {
            e.code = Some("internal_error");
        }
        e
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        Self::from_status(&s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, error = %self.message, "HTTP request failed");
        } else {
            tracing::debug!(status = %self.status, error = %self.message, "HTTP request refused");
        }
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The body was not read to its end: the connection cannot carry another request,
            // and a client must not pick it from its pool.
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        r
    }
}
