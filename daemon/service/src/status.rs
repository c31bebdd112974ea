//! Errors as gRPC statuses: scheduler errors with the scheduler's message (ids, limits,
//! numbers), every message capped to [`MAX_MESSAGE`] bytes (standard clients refuse oversized
//! metadata, and a message must never echo a whole grammar or prompt), and every INTERNAL
//! logged, in the caller's span (its RPC, tenant and request id), with the full detail.

use agentd_scheduler::SchedError;
use tonic::Status;

/// The longest message a status carries, in bytes.
pub const MAX_MESSAGE: usize = 2048;

/// `msg` cut to [`MAX_MESSAGE`] bytes (at a character boundary), marked as cut.
pub fn cap(msg: &str) -> String {
    if msg.len() <= MAX_MESSAGE {
        return msg.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &msg[..end], msg.len() - end)
}

/// A fresh request id (64 random bits, in hex) for the log and for INTERNAL messages.
pub fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// INVALID_ARGUMENT with `e`'s message, capped.
pub fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(cap(&e.to_string()))
}

/// INTERNAL: the detail goes to the log (in the caller's span, which names the request); the
/// client gets it capped.
pub fn internal(detail: String) -> Status {
    tracing::error!(error = %detail, "request failed with INTERNAL");
    Status::internal(cap(&detail))
}

/// The status a scheduler error is reported as.
pub fn to_status(e: SchedError) -> Status {
    let msg = e.to_string();
    match e {
        SchedError::UnknownSession(_) | SchedError::UnknownPrefix(_) => {
            Status::not_found(cap(&msg))
        }
        SchedError::SessionBusy(_) => Status::failed_precondition(cap(&msg)),
        SchedError::InvalidRequest(_) => Status::invalid_argument(cap(&msg)),
        SchedError::ContextOverflow { .. } => Status::out_of_range(cap(&msg)),
        SchedError::PoolTooSmall { .. } | SchedError::LimitExceeded { .. } => {
            Status::resource_exhausted(cap(&msg))
        }
        // A constraint that exhausts the grammar engine's per-token limits mid-stream (the
        // compile-time probe walks only its first tokens) is the request's fault; it is
        // logged like an INTERNAL, since the stream had already started.
        SchedError::Generation(ref cause)
            if matches!(
                *cause.0,
                agentd_engine::EngineError::Constraint(
                    agentd_engine::constraint::ConstraintError::Failed(_)
                )
            ) =>
        {
            tracing::warn!(error = %msg, "a constraint failed while generating");
            Status::invalid_argument(cap(&msg))
        }
        SchedError::Executor(_)
        | SchedError::Generation(_)
        | SchedError::Engine(_)
        | SchedError::DiskTier(_)
        | SchedError::Cache(_)
        | SchedError::Spawn(_) => internal(msg),
        SchedError::Shutdown => Status::unavailable(cap(&msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let c = cap(&long);
        assert!(c.len() < MAX_MESSAGE + 32, "{}", c.len());
        assert!(c.ends_with("bytes cut)"), "{c}");
        assert_eq!(cap("short"), "short");
    }
}
