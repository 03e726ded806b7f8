//! Request ids on Postgres: the primitives of [`RequestRows`]. The
//! insert comes before the look-up: a concurrent call with the same id
//! waits on it until the first one's transaction ends, then finds its
//! record (or, if it rolled back, records its own).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use vilvik_keys_domain::AccountId;

use super::{Pg, execute, query_one};
use crate::db::{Claim, RequestRows};
use crate::rules::StoredRequest;
use crate::{Result, rows};

impl<C: GenericClient + Send> RequestRows for Pg<C> {
    async fn forget_expired(&mut self, claim: &Claim<'_>, now: OffsetDateTime) -> Result<()> {
        let Claim {
            account, request, ..
        } = claim;
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

    async fn record_request(&mut self, claim: &Claim<'_>) -> Result<bool> {
        let Claim {
            account,
            request,
            caller,
        } = claim;
        let claimed = execute(
            &self.0,
            "INSERT INTO requests (account_id, request_digest, method, params_digest, key_id, \
             sealed_secret, pepper_id, expires_at, caller) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
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
                caller,
            ],
        )
        .await?;
        Ok(claimed == 1)
    }

    async fn recorded_request(&mut self, claim: &Claim<'_>) -> Result<StoredRequest> {
        let Claim {
            account, request, ..
        } = claim;
        let sql = "SELECT method, params_digest, key_id, sealed_secret, pepper_id, caller \
                   FROM requests \
                   WHERE account_id = $1 AND request_digest = $2";
        rows::request(&query_one(&self.0, sql, &[&account.as_str(), &&request.digest[..]]).await?)
    }

    async fn count_live_requests(
        &mut self,
        account: &AccountId,
        now: OffsetDateTime,
        upto: u32,
    ) -> Result<u32> {
        let sql = "SELECT COUNT(*) FROM (SELECT 1 FROM requests WHERE account_id = $1 \
                   AND expires_at > $2 LIMIT $3) AS live";
        let row = query_one(&self.0, sql, &[&account.as_str(), &now, &i64::from(upto)]).await?;
        rows::count(&row)
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
