//! Who is calling: the caller's tenant and whether it is an operator, from the connection alone
//! (Unix peer credentials, a TCP bearer token) — the rules `agentd serve` and `agentd route`
//! share, so a client sees the same tenancy through either.
//!
//! **Delegation.** An operator (a Unix-socket peer whose uid is in [`Access::operators`]) may
//! act as another tenant by sending `x-agentd-tenant: <u64>` ([`TENANT_HEADER`]); it is then
//! that tenant, and an operator only if it also sends `x-agentd-operator: 1`
//! ([`OPERATOR_HEADER`]). This is how `agentd route` forwards its clients' calls to the daemons
//! behind it. Anyone else sending either header gets PERMISSION_DENIED: a tenant can never
//! choose its tenant.

use agentd_scheduler::TenantId;
use std::collections::{HashMap, HashSet};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// Metadata an operator sends to act as another tenant (a decimal u64).
pub const TENANT_HEADER: &str = "x-agentd-tenant";
/// Metadata (`1`) an operator sends with [`TENANT_HEADER`] to keep its operator rights.
pub const OPERATOR_HEADER: &str = "x-agentd-operator";

/// This process's effective uid: a server's own uid is always one of its operators.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// How callers on the Unix socket map to tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenancy {
    /// A personal daemon: every caller is tenant 0.
    Single,
    /// Each Unix user (peer uid) is its own tenant.
    PerUid,
    /// The configuration's uid → tenant map; other uids are refused.
    Map(HashMap<u32, TenantId>),
}

/// The access rules of one server: its tenancy, its TCP bearer tokens and its operators.
#[derive(Debug, Clone)]
pub struct Access {
    /// How Unix-socket peers map to tenants.
    pub tenancy: Tenancy,
    /// Bearer token → tenant, for calls over TCP.
    pub tokens: HashMap<String, TenantId>,
    /// Unix uids allowed the admin RPCs and delegation.
    pub operators: HashSet<u32>,
    /// What the server calls itself in refusals ("daemon", "router").
    pub server: &'static str,
}

/// A caller, as identified by [`Access::caller`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The tenant it acts as.
    pub tenant: TenantId,
    /// Whether it may make admin calls.
    pub operator: bool,
    /// Its Unix uid (None over TCP).
    pub uid: Option<u32>,
}

impl Access {
    /// The caller of `req`: over the Unix socket from the connection's peer credentials (or,
    /// for an operator, the delegation headers), over TCP from its bearer token; never from a
    /// request field.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let delegated = req.metadata().get(TENANT_HEADER);
        let keep_operator = req.metadata().get(OPERATOR_HEADER);
        let Some(uds) = req.extensions().get::<UdsConnectInfo>() else {
            if delegated.is_some() || keep_operator.is_some() {
                return Err(Status::permission_denied(format!(
                    "{TENANT_HEADER} and {OPERATOR_HEADER} are only accepted over the Unix socket, from an operator"
                )));
            }
            return Ok(Caller {
                tenant: self.tcp_tenant(req)?,
                operator: false,
                uid: None,
            });
        };
        let uid = uds.peer_cred.map(|c| c.uid());
        let is_operator = uid.is_some_and(|u| self.operators.contains(&u));
        if delegated.is_some() || keep_operator.is_some() {
            if !is_operator {
                return Err(Status::permission_denied(format!(
                    "{TENANT_HEADER} and {OPERATOR_HEADER} are only accepted from an operator of this {} (uid {} is not one)",
                    self.server,
                    uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
                )));
            }
            let Some(value) = delegated else {
                return Err(Status::invalid_argument(format!(
                    "{OPERATOR_HEADER} needs {TENANT_HEADER}"
                )));
            };
            let tenant = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<TenantId>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!("{TENANT_HEADER} is not a decimal u64"))
                })?;
            let operator = match keep_operator.map(|v| v.to_str()) {
                None => false,
                Some(Ok("1")) => true,
                Some(_) => {
                    return Err(Status::invalid_argument(format!(
                        "{OPERATOR_HEADER} must be 1 when given"
                    )))
                }
            };
            return Ok(Caller {
                tenant,
                operator,
                uid,
            });
        }
        let tenant = match (&self.tenancy, uid) {
            (Tenancy::Single, _) => 0,
            (_, None) => {
                return Err(Status::permission_denied(
                    "the caller's peer credentials are unavailable",
                ))
            }
            (Tenancy::Map(map), Some(uid)) => map.get(&uid).copied().ok_or_else(|| {
                Status::permission_denied(format!(
                    "uid {uid} is not a tenant of this {} (see [tenants] in its config)",
                    self.server
                ))
            })?,
            (Tenancy::PerUid, Some(uid)) => TenantId::from(uid),
        };
        Ok(Caller {
            tenant,
            operator: is_operator,
            uid,
        })
    }

    /// The caller of `req` when it is an operator; anyone else gets PERMISSION_DENIED naming
    /// the reason.
    pub fn operator<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = self.caller(req)?;
        match caller.uid {
            _ if caller.operator => Ok(caller),
            Some(uid) if self.operators.contains(&uid) => Err(Status::permission_denied(format!(
                "a call as tenant {} is not an operator's without {OPERATOR_HEADER}: 1",
                caller.tenant
            ))),
            Some(uid) => Err(Status::permission_denied(format!(
                "uid {uid} is not an operator of this {} (operators are its own uid and the config's `operators`)",
                self.server
            ))),
            None => Err(Status::permission_denied(
                "admin calls are only accepted over the Unix socket, from an operator's uid",
            )),
        }
    }

    /// A TCP caller's tenant, from `authorization: Bearer <token>`.
    fn tcp_tenant<T>(&self, req: &Request<T>) -> Result<TenantId, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header is not `Bearer <token>`")
            })?;
        self.tokens
            .get(token)
            .copied()
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            tenancy: Tenancy::PerUid,
            tokens: [("t".repeat(16), 7)].into_iter().collect(),
            operators: [0].into_iter().collect(),
            server: "daemon",
        }
    }

    /// A request with `headers`, over TCP (no peer credentials).
    fn tcp(headers: &[(&'static str, &str)]) -> Request<()> {
        let mut r = Request::new(());
        for (k, v) in headers {
            r.metadata_mut().insert(*k, v.parse().unwrap());
        }
        r
    }

    #[test]
    fn a_tcp_caller_cannot_delegate_and_is_never_an_operator() {
        let a = access();
        let token = format!("Bearer {}", "t".repeat(16));
        let c = a.caller(&tcp(&[("authorization", &token)])).unwrap();
        assert_eq!((c.tenant, c.operator), (7, false));
        let e = a
            .caller(&tcp(&[("authorization", &token), (TENANT_HEADER, "9")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains(TENANT_HEADER), "{e}");
        let e = a.operator(&tcp(&[("authorization", &token)])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let e = a.caller(&tcp(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }
}
