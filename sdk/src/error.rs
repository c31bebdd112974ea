//! The SDK's error type: gRPC statuses mapped to what went wrong.

use tonic::{Code, Status};

/// What a call to the daemon can fail with. The daemon's message says exactly what was wrong
/// (which id, which limit, which numbers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Could not reach the daemon (no socket, nobody listening, connection lost).
    #[error("cannot reach agentd: {0}")]
    Unavailable(String),
    /// An id that does not exist for this caller (never existed, closed, or another tenant's).
    #[error("not found: {0}")]
    NotFound(String),
    /// A malformed request (empty input, bad sampling parameters, unknown token, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request that would not fit the model's context.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A limit was reached (pool, quota, concurrency); the message names it.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The session is busy with another generation, or another precondition failed.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The caller is not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The daemon failed (a bug); the message says where.
    #[error("daemon error ({code:?}): {message}")]
    Daemon {
        /// The gRPC status code.
        code: Code,
        /// The daemon's message.
        message: String,
    },
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            Code::NotFound => Error::NotFound(m),
            Code::InvalidArgument => Error::InvalidArgument(m),
            Code::OutOfRange => Error::OutOfRange(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::PermissionDenied | Code::Unauthenticated => Error::PermissionDenied(m),
            Code::Unavailable => Error::Unavailable(m),
            code => Error::Daemon { code, message: m },
        }
    }
}
