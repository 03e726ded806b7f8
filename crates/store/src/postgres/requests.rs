//! Request ids on Postgres: the primitives of [`RequestRows`]. The
//! insert comes before the look-up: a concurrent call with the same id
//! waits on it until the first one's transaction ends, then finds its
//! record (or, if it rolled back, records its own).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use vilvik_keys_domain::AccountId;

use super::{Pg, execute, map_err, query_one};
use crate::db::RequestRows;
use crate::rules::StoredRequest;
use crate::{RequestRecord, Result};

impl<C: GenericClient + Send> RequestRows for Pg<C> {
    async fn forget_expired_request(
        &mut self,
        account: &AccountId,
        request: &RequestRecord,
        now: OffsetDateTime,
    ) -> Result<()> {
        let sql = "DELETE FROM requests WHERE account_id = $1 AND request_digest = $2 \
                   AND expires_at <= $3";
        execute(
            &self.0,
            sql,
            &[&account.as_str(), &&request.digest[..], &now],
        )
        .await?;
        Ok(())
    }

    async fn record_request(
        &mut self,
        account: &AccountId,
        request: &RequestRecord,
    ) -> Result<bool> {
        let claimed = execute(
            &self.0,
            "INSERT INTO requests (account_id, request_digest, method, params_digest, key_id, \
             sealed_secret, pepper_id, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (account_id, request_digest) DO NOTHING",
            &[
                &account.as_str(),
                &&request.digest[..],
                &request.method.as_str(),
                &&request.params[..],
                &request.key_id.as_str(),
                &request.sealed,
                &request.pepper_id.to_stored(),
                &request.expires_at,
            ],
        )
        .await?;
        Ok(claimed == 1)
    }

    async fn recorded_request(
        &mut self,
        account: &AccountId,
        request: &RequestRecord,
    ) -> Result<StoredRequest> {
        let sql = "SELECT method, params_digest, key_id, sealed_secret, pepper_id FROM requests \
                   WHERE account_id = $1 AND request_digest = $2";
        let row = query_one(&self.0, sql, &[&account.as_str(), &&request.digest[..]]).await?;
        Ok(StoredRequest {
            method: row.try_get(0).map_err(map_err)?,
            params: row.try_get(1).map_err(map_err)?,
            key_id: row.try_get(2).map_err(map_err)?,
            sealed: row.try_get(3).map_err(map_err)?,
            pepper_id: row.try_get(4).map_err(map_err)?,
        })
    }

    async fn prune_requests(&mut self, now: OffsetDateTime) -> Result<u64> {
        execute(
            &self.0,
            "DELETE FROM requests WHERE expires_at <= $1",
            &[&now],
        )
        .await
    }
}
