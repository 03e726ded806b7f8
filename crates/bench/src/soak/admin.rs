//! The admin tasks: each drives its accounts through the key lifecycle at
//! a fixed pace.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;
use vilvik_keys::proto::{
    CreateKeyRequest, GetKeyRequest, ListAuditEventsRequest, ListKeysRequest, RevokeKeyRequest,
    RotateKeyRequest, UpdateKeyRequest, key_admin_client::KeyAdminClient,
};

use super::calls::{Record, Shared, at_stored_key_ceiling, bearer};
use super::pool::Rng;
use crate::client::admin_client;

/// An account an admin task drives: its management key, its tier cap and
/// the keys the soak holds active in it, oldest first.
pub(super) struct Account {
    pub(super) management_key: String,
    pub(super) cap: u32,
    pub(super) active: VecDeque<String>,
    pub(super) created: u64,
    pub(super) full: bool,
}

/// One admin task: its connection, its record and its random choices.
struct AdminTask {
    shared: Arc<Shared>,
    client: KeyAdminClient<Channel>,
    record: Record,
    rng: Rng,
    /// The scope keys are created with.
    scope: String,
    /// Calls made so far.
    step: usize,
}

/// Cycles through `accounts` at `rate` calls a second until the soak stops.
pub(super) async fn admin_task(
    shared: Arc<Shared>,
    channel: Channel,
    mut accounts: Vec<Account>,
    rate: f64,
    scope: String,
    salt: u64,
) -> anyhow::Result<Record> {
    let mut task = AdminTask {
        shared,
        client: admin_client(&channel),
        record: Record::default(),
        rng: Rng::seeded(salt),
        scope,
        step: 0,
    };
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'run: loop {
        for account in &mut accounts {
            for op in CYCLE {
                if task.shared.stop.load(Ordering::Relaxed) {
                    break 'run;
                }
                // Revoke only to make room; a full account keeps its keys.
                let needed = match op {
                    Op::Revoke => !account.full && account.active.len() + 1 >= account.cap as usize,
                    Op::Create => true,
                    _ => !account.active.is_empty(),
                };
                if !needed {
                    continue;
                }
                pace.tick().await;
                task.step += 1;
                task.op(account, op).await?;
            }
        }
    }
    Ok(task.record)
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Op {
    Revoke,
    Create,
    Update,
    Get,
    Rotate,
    ListKeys,
    ListAudit,
}

/// One pass over an account.
pub(super) const CYCLE: [Op; 7] = [
    Op::Revoke,
    Op::Create,
    Op::Update,
    Op::Get,
    Op::Rotate,
    Op::ListKeys,
    Op::ListAudit,
];

impl AdminTask {
    /// One call of `op` on `account`. Requests set only the fields the soak
    /// uses (no request ids, no etags): `..Default::default()` leaves the rest
    /// empty, as a client that knows none of them would.
    async fn op(&mut self, account: &mut Account, op: Op) -> anyhow::Result<()> {
        let (shared, client, record) = (&self.shared, &mut self.client, &mut self.record);
        let (rng, scope, step) = (&mut self.rng, self.scope.as_str(), self.step);
        let key = account.management_key.clone();
        let any_active = |rng: &mut Rng, account: &Account| {
            account.active[(rng.next() % account.active.len() as u64) as usize].clone()
        };
        match op {
            Op::Revoke => {
                let key_id = account.active[0].clone();
                let request = bearer(
                    RevokeKeyRequest {
                        key_id: key_id.clone(),
                        reason: "vilvik-keys-bench soak".to_owned(),
                        ..Default::default()
                    },
                    &key,
                )?;
                if shared
                    .call(record, "RevokeKey", client.revoke_key(request))
                    .await
                    .is_ok()
                {
                    account.active.pop_front();
                    shared.pool.write().unwrap().retire(&key_id, true);
                }
            }
            Op::Create => {
                let request = bearer(
                    CreateKeyRequest {
                        name: format!("soak-{}", account.created),
                        description: "vilvik-keys-bench soak".to_owned(),
                        scopes: vec![scope.to_owned()],
                        ..Default::default()
                    },
                    &key,
                )?;
                match shared
                    .call(record, "CreateKey", client.create_key(request))
                    .await
                {
                    Ok(created) => {
                        let key_id = created.key.context("CreateKey answered no key")?.key_id;
                        account.created += 1;
                        account.active.push_back(key_id.clone());
                        shared
                            .pool
                            .write()
                            .unwrap()
                            .current
                            .push((key_id, created.secret));
                    }
                    Err(s) if at_stored_key_ceiling(&s) => {
                        account.full = true;
                        record.refused_at_ceiling += 1;
                    }
                    Err(_) => {}
                }
            }
            Op::Update => {
                let request = bearer(
                    UpdateKeyRequest {
                        key_id: any_active(rng, account),
                        description: format!("vilvik-keys-bench soak, update {step}"),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["description".to_owned()],
                        }),
                        ..Default::default()
                    },
                    &key,
                )?;
                let _ = shared
                    .call(record, "UpdateKey", client.update_key(request))
                    .await;
            }
            Op::Get => {
                let request = bearer(
                    GetKeyRequest {
                        key_id: any_active(rng, account),
                    },
                    &key,
                )?;
                let _ = shared.call(record, "GetKey", client.get_key(request)).await;
            }
            Op::Rotate => {
                let key_id = any_active(rng, account);
                let request = bearer(
                    RotateKeyRequest {
                        key_id: key_id.clone(),
                        ..Default::default()
                    },
                    &key,
                )?;
                if let Ok(rotated) = shared
                    .call(record, "RotateKey", client.rotate_key(request))
                    .await
                {
                    let mut pool = shared.pool.write().unwrap();
                    pool.retire(&key_id, false);
                    pool.current.push((key_id, rotated.secret));
                }
            }
            Op::ListKeys => {
                let request = bearer(
                    ListKeysRequest {
                        page_size: 50,
                        include_revoked: step.is_multiple_of(2),
                        ..Default::default()
                    },
                    &key,
                )?;
                let _ = shared
                    .call(record, "ListKeys", client.list_keys(request))
                    .await;
            }
            Op::ListAudit => {
                // The account's log, or one key's.
                let key_id = if step.is_multiple_of(2) {
                    String::new()
                } else {
                    any_active(rng, account)
                };
                let request = bearer(
                    ListAuditEventsRequest {
                        key_id,
                        page_size: 50,
                        ..Default::default()
                    },
                    &key,
                )?;
                let _ = shared
                    .call(record, "ListAuditEvents", client.list_audit_events(request))
                    .await;
            }
        }
        Ok(())
    }
}
