//! Scheduler errors as gRPC statuses, with the scheduler's message (ids, limits, numbers).

use agentd_scheduler::SchedError;
use tonic::Status;

/// The status a scheduler error is reported as.
pub fn to_status(e: SchedError) -> Status {
    let msg = e.to_string();
    match e {
        SchedError::UnknownSession(_) | SchedError::UnknownPrefix(_) => Status::not_found(msg),
        SchedError::SessionBusy(_) => Status::failed_precondition(msg),
        SchedError::InvalidRequest(_) => Status::invalid_argument(msg),
        SchedError::ContextOverflow { .. } => Status::out_of_range(msg),
        SchedError::PoolTooSmall { .. } | SchedError::LimitExceeded { .. } => {
            Status::resource_exhausted(msg)
        }
        SchedError::Executor(_)
        | SchedError::Generation(_)
        | SchedError::Engine(_)
        | SchedError::DiskTier(_)
        | SchedError::Cache(_)
        | SchedError::Spawn(_) => Status::internal(msg),
        SchedError::Shutdown => Status::unavailable(msg),
    }
}
