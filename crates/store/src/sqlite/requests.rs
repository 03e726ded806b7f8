//! Request ids on SQLite: the primitives of [`RequestRows`]. The write
//! lock `BEGIN IMMEDIATE` took makes a look-up and the insert after it
//! one step.

use rusqlite::params;
use time::OffsetDateTime;
use vilvik_keys_domain::AccountId;

use super::{Sqlite, map_err, to_micros};
use crate::db::{Claim, RequestRows};
use crate::rules::StoredRequest;
use crate::{Result, rows};

impl RequestRows for Sqlite<'_> {
    async fn forget_expired(&mut self, claim: &Claim<'_>, now: OffsetDateTime) -> Result<()> {
        let Claim {
            account, request, ..
        } = claim;
        self.prepare_cached(
            "DELETE FROM requests WHERE account_id = ?1 AND request_digest = ?2 \
             AND expires_at <= ?3",
        )
        .map_err(map_err)?
        .execute(params![
            account.as_str(),
            &request.digest[..],
            to_micros(now)
        ])
        .map_err(map_err)?;
        Ok(())
    }

    async fn record_request(&mut self, claim: &Claim<'_>) -> Result<bool> {
        let Claim {
            account,
            request,
            caller,
        } = claim;
        let inserted = self
            .prepare_cached(
                "INSERT INTO requests (account_id, request_digest, method, params_digest, key_id, \
                 sealed_secret, pepper_id, expires_at, caller) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (account_id, request_digest) DO NOTHING",
            )
            .map_err(map_err)?
            .execute(params![
                account.as_str(),
                &request.digest[..],
                request.method.as_str(),
                &request.params[..],
                request.key_id.as_str(),
                request.sealed,
                request.pepper_id.to_stored(),
                to_micros(request.expires_at),
                caller,
            ])
            .map_err(map_err)?;
        Ok(inserted == 1)
    }

    async fn recorded_request(&mut self, claim: &Claim<'_>) -> Result<StoredRequest> {
        let Claim {
            account, request, ..
        } = claim;
        self.prepare_cached(
            "SELECT method, params_digest, key_id, sealed_secret, pepper_id, caller FROM requests \
             WHERE account_id = ?1 AND request_digest = ?2",
        )
        .map_err(map_err)?
        .query_row(params![account.as_str(), &request.digest[..]], |row| {
            Ok(rows::request(row))
        })
        .map_err(map_err)?
    }

    async fn count_live_requests(
        &mut self,
        account: &AccountId,
        now: OffsetDateTime,
        upto: u32,
    ) -> Result<u32> {
        self.prepare_cached(
            "SELECT COUNT(*) FROM (SELECT 1 FROM requests WHERE account_id = ?1 \
             AND expires_at > ?2 LIMIT ?3)",
        )
        .map_err(map_err)?
        .query_row(
            params![account.as_str(), to_micros(now), i64::from(upto)],
            |row| Ok(rows::count(row)),
        )
        .map_err(map_err)?
    }

    async fn prune_requests(&mut self, now: OffsetDateTime) -> Result<u64> {
        self.execute(
            "DELETE FROM requests WHERE expires_at <= ?1",
            params![to_micros(now)],
        )
        .map(|n| n as u64)
        .map_err(map_err)
    }
}
