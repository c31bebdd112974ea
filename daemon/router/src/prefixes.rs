//! Prefixes through the router ([`crate::registry`]): registering one on a placed daemon and
//! learning its tokens, registering it on further daemons when sessions are placed there,
//! and publishing, unpinning, dropping and listing on every daemon that has it.

use crate::backend::Backend;
use crate::placement::CacheNamespace;
use crate::registry::Prefix;
use crate::service::{forward, RouterService};
use agentd_service::access::Caller;
use agentd_wire::proto;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::{Code, Status};

/// The cache namespace a prefix's KV is under on the daemons: the owner's, or (published) the
/// one derived from its tokens, the same on every daemon.
pub(crate) fn namespace(p: &Prefix) -> CacheNamespace {
    if p.published {
        CacheNamespace::Published(agentd_scheduler::published_namespace(&p.tokens))
    } else {
        CacheNamespace::Tenant(p.tenant)
    }
}

impl RouterService {
    /// RegisterPrefix: on one placed daemon, then its tokens learnt (rendered messages are
    /// read back through a short-lived session) and a router id handed out.
    pub(crate) async fn register(
        &self,
        caller: &Caller,
        r: proto::RegisterPrefixRequest,
    ) -> Result<proto::RegisterPrefixReply, Status> {
        if !r.tokens.is_empty() && !r.messages.is_empty() {
            return Err(Status::invalid_argument(
                "give either tokens or messages, not both",
            ));
        }
        let ns = if r.publish {
            CacheNamespace::Published(agentd_scheduler::published_namespace(&r.tokens))
        } else {
            CacheNamespace::Tenant(caller.tenant)
        };
        let mut last = None;
        for _ in 0..=self.backends.all().len() {
            let b = self.place(&r.tokens, ns, &[], 0)?;
            let reply = match b.client().register_prefix(forward(caller, r.clone())).await {
                Ok(reply) => reply.into_inner(),
                Err(s) => match b.status(s) {
                    s if s.code() == Code::Unavailable => {
                        last = Some(s);
                        continue;
                    }
                    s => return Err(s),
                },
            };
            let node = b
                .node()
                .ok_or_else(|| b.status(Status::unavailable("no node")))?;
            let tokens = if r.messages.is_empty() {
                r.tokens
            } else {
                read_tokens(&b, caller, reply.prefix_id).await?
            };
            let p = self.registry.insert(
                caller.tenant,
                r.publish,
                tokens,
                BTreeMap::from([(node, reply.prefix_id)]),
            );
            tracing::info!(
                prefix = p.id,
                node,
                tokens = p.tokens.len(),
                "prefix registered"
            );
            return Ok(proto::RegisterPrefixReply {
                prefix_id: p.id,
                tokens: reply.tokens,
            });
        }
        Err(last.unwrap_or_else(|| self.none_up()))
    }

    /// The prefix's id on daemon `b`, registering it there first (as its owner, from its
    /// tokens) if it is not yet.
    pub(crate) async fn ensure_on(&self, p: &Prefix, b: &Backend) -> Result<u64, Status> {
        let node = b
            .node()
            .ok_or_else(|| b.status(Status::unavailable("no node number yet")))?;
        let mut on = p.on.lock().await;
        if let Some(&id) = on.get(&node) {
            return Ok(id);
        }
        let owner = Caller {
            tenant: p.tenant,
            operator: p.published,
            uid: None,
        };
        let req = proto::RegisterPrefixRequest {
            tokens: p.tokens.clone(),
            publish: p.published,
            messages: Vec::new(),
        };
        let reply = b
            .client()
            .register_prefix(forward(&owner, req))
            .await
            .map_err(|s| b.status(s))?
            .into_inner();
        tracing::info!(
            prefix = p.id,
            node,
            daemon_prefix = reply.prefix_id,
            "prefix registered on another daemon"
        );
        on.insert(node, reply.prefix_id);
        Ok(reply.prefix_id)
    }

    /// DropPrefix (`unpin` false: the caller's own prefix) or UnpinPrefix (`unpin`: an
    /// operator's, any prefix): on every daemon that has it, then forgotten. A daemon that
    /// cannot be reached is skipped (logged).
    pub(crate) async fn forget(&self, caller: &Caller, id: u64, unpin: bool) -> Result<(), Status> {
        let not_found = || Status::not_found(format!("prefix {id} not found"));
        let p = self
            .registry
            .get(id, caller.tenant, unpin)
            .filter(|p| unpin || p.tenant == caller.tenant)
            .ok_or_else(not_found)?;
        let on = p.on.lock().await.clone();
        for (node, daemon_id) in on {
            let Some(b) = self.backends.by_node(node) else {
                continue;
            };
            let req = forward(
                caller,
                proto::PrefixRef {
                    prefix_id: daemon_id,
                },
            );
            let r = if unpin {
                b.client().unpin_prefix(req).await.map(|_| ())
            } else {
                b.client().drop_prefix(req).await.map(|_| ())
            };
            match r.map_err(|s| b.status(s)) {
                Ok(()) => {}
                Err(s) if matches!(s.code(), Code::Unavailable | Code::NotFound) => {
                    tracing::warn!(
                        prefix = id,
                        node,
                        error = s.message(),
                        "prefix not dropped there"
                    );
                }
                Err(s) => return Err(s),
            }
        }
        self.registry.remove(id);
        Ok(())
    }

    /// PublishPrefix: a published copy on every daemon that has the prefix, under a new
    /// router id.
    pub(crate) async fn publish(
        &self,
        caller: &Caller,
        id: u64,
    ) -> Result<proto::RegisterPrefixReply, Status> {
        let p = self
            .registry
            .get(id, caller.tenant, true)
            .ok_or_else(|| Status::not_found(format!("prefix {id} not found")))?;
        let on = p.on.lock().await.clone();
        let mut published = BTreeMap::new();
        let mut last = None;
        for (node, daemon_id) in on {
            let Some(b) = self.backends.by_node(node) else {
                continue;
            };
            let req = forward(
                caller,
                proto::PrefixRef {
                    prefix_id: daemon_id,
                },
            );
            match b
                .client()
                .publish_prefix(req)
                .await
                .map_err(|s| b.status(s))
            {
                Ok(r) => {
                    published.insert(node, r.into_inner().prefix_id);
                }
                Err(s) if s.code() == Code::Unavailable => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        if published.is_empty() {
            return Err(last.unwrap_or_else(|| self.none_up()));
        }
        let tokens = p.tokens.len() as u32;
        let copy = self
            .registry
            .insert(p.tenant, true, p.tokens.clone(), published);
        Ok(proto::RegisterPrefixReply {
            prefix_id: copy.id,
            tokens,
        })
    }

    /// ListPrefixes: the registry's prefixes the caller may see, with the tokens resident on
    /// the daemon that holds most of each.
    pub(crate) async fn list(
        &self,
        caller: &Caller,
        all: bool,
    ) -> Result<proto::ListPrefixesReply, Status> {
        let entries = self.registry.list(caller.tenant, all);
        // (node, daemon prefix id) → resident tokens, from every live daemon.
        let mut resident: HashMap<(u8, u64), u32> = HashMap::new();
        for b in self.backends.live() {
            let Some(node) = b.node() else { continue };
            let req = forward(caller, proto::ListPrefixesRequest { all_tenants: all });
            match b.client().list_prefixes(req).await.map_err(|s| b.status(s)) {
                Ok(r) => {
                    for e in r.into_inner().prefixes {
                        resident.insert((node, e.prefix_id), e.resident_tokens);
                    }
                }
                Err(s) if s.code() == Code::Unavailable => {}
                Err(s) => return Err(s),
            }
        }
        let mut prefixes = Vec::with_capacity(entries.len());
        for p in entries {
            let on = p.on.lock().await.clone();
            let resident_tokens = on
                .iter()
                .filter_map(|(&n, &d)| resident.get(&(n, d)).copied())
                .max()
                .unwrap_or(0);
            prefixes.push(proto::PrefixEntry {
                prefix_id: p.id,
                tokens: p.tokens.len() as u32,
                pinned: true,
                published: p.published,
                resident_tokens,
                own: p.tenant == caller.tenant,
                tenant: if all { p.tenant } else { 0 },
            });
        }
        Ok(proto::ListPrefixesReply { prefixes })
    }
}

/// A registered prefix's tokens, read back from daemon `b` through a session opened on it and
/// closed again.
async fn read_tokens(
    b: &Arc<Backend>,
    caller: &Caller,
    prefix_id: u64,
) -> Result<Vec<u32>, Status> {
    let mut client = b.client();
    let session = client
        .create_session(forward(
            caller,
            proto::CreateSessionRequest {
                prefix_id,
                tokens: Vec::new(),
            },
        ))
        .await
        .map_err(|s| b.status(s))?
        .into_inner()
        .session_id;
    let tokens = client
        .session_tokens(forward(
            caller,
            proto::SessionRef {
                session_id: session,
            },
        ))
        .await
        .map_err(|s| b.status(s));
    if let Err(s) = client
        .close_session(forward(
            caller,
            proto::SessionRef {
                session_id: session,
            },
        ))
        .await
    {
        tracing::warn!(
            error = s.message(),
            "closing the session that read a prefix's tokens"
        );
    }
    Ok(tokens?.into_inner().tokens)
}
