//! The change log on Postgres: the primitives of [`ChangeRows`] (the
//! `NOTIFY` side of the feed; the `LISTEN` side is `listen.rs`), and the
//! streams verify nodes warm their caches from.

use deadpool_postgres::GenericClient;
use futures_util::TryStreamExt;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::Row;
use vilvik_keys_domain::KeyPrefix;

use super::{
    CHANGE_CHANNEL, CHANGE_LOG_LOCK, NO_STATEMENT_TIMEOUT, Pg, PostgresStore, execute, listen,
    map_err, query, query_one,
};
use crate::backend::Sink;
use crate::db::ChangeRows;
use crate::{Result, rows, stream};

impl<C: GenericClient + Send> ChangeRows for Pg<C> {
    async fn change_sequence(&mut self) -> Result<i64> {
        let sql = "SELECT COALESCE(MAX(seq), 0) FROM key_changes";
        let row = query_one(&self.0, sql, &[]).await?;
        row.try_get(0).map_err(map_err)
    }

    async fn changes_after(&mut self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        let sql = "SELECT seq, prefix FROM key_changes WHERE seq > $1 ORDER BY seq LIMIT $2";
        let found = query(&self.0, sql, &[&seq, &i64::from(limit)]).await?;
        found.iter().map(rows::change).collect()
    }

    async fn change_floor(&mut self) -> Result<i64> {
        let row = query_one(&self.0, "SELECT pruned_through FROM change_log_floor", &[]).await?;
        row.try_get(0).map_err(map_err)
    }

    /// The advisory lock (held until commit) makes sequence numbers commit
    /// in order: without it a transaction holding seq 5 could commit after
    /// one holding seq 6, and a follower that already read 6 would never
    /// see 5. `NOTIFY` is delivered at commit.
    async fn publish_change(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> Result<()> {
        self.lock_change_log().await?;
        let row = query_one(
            &self.0,
            "INSERT INTO key_changes (prefix, at) VALUES ($1, $2) RETURNING seq",
            &[&prefix.as_str(), &at],
        )
        .await?;
        let seq: i64 = row.try_get(0).map_err(map_err)?;
        let payload = listen::notification_payload(seq, prefix);
        execute(
            &self.0,
            "SELECT pg_notify($1, $2)",
            &[&CHANGE_CHANNEL, &payload],
        )
        .await?;
        Ok(())
    }

    async fn lock_change_log(&mut self) -> Result<()> {
        execute(
            &self.0,
            "SELECT pg_advisory_xact_lock($1)",
            &[&CHANGE_LOG_LOCK],
        )
        .await?;
        Ok(())
    }

    async fn last_prunable_change(&mut self, before: OffsetDateTime) -> Result<Option<i64>> {
        let row = query_one(
            &self.0,
            "SELECT MAX(seq) FROM key_changes \
             WHERE at < $1 AND seq < (SELECT MAX(seq) FROM key_changes)",
            &[&before],
        )
        .await?;
        row.try_get(0).map_err(map_err)
    }

    async fn delete_changes_through(&mut self, seq: i64) -> Result<u64> {
        execute(&self.0, "DELETE FROM key_changes WHERE seq <= $1", &[&seq]).await
    }

    async fn set_change_floor(&mut self, floor: i64) -> Result<()> {
        let sql = "UPDATE change_log_floor SET pruned_through = $1";
        execute(&self.0, sql, &[&floor]).await?;
        Ok(())
    }
}

impl PostgresStore {
    /// One query on a pooled connection, its rows streamed (never all in
    /// memory) and decoded by a task of its own that sends batches to the
    /// caller as it goes. One statement is one snapshot, so the read is
    /// consistent; it runs in a transaction of its own only to lift the
    /// statement timeout, since streaming a million rows to a slow sink
    /// rightly takes longer than a request.
    pub(super) async fn stream_rows<T: Send + 'static>(
        &self,
        query: &'static str,
        params: Vec<Option<String>>,
        batch: usize,
        decode: fn(&Row) -> Result<T>,
        sink: Sink<'_, T>,
    ) -> Result<usize> {
        let mut client = self.client().await?;
        let (tx, rx) = mpsc::channel(stream::BUFFERED_BATCHES);
        let producer = tokio::spawn(async move {
            let read = client.transaction().await.map_err(map_err)?;
            read.batch_execute(NO_STATEMENT_TIMEOUT)
                .await
                .map_err(map_err)?;
            // Prepared (and cached), so rows decode by the statement's
            // column types without a lookup.
            let stmt = read.prepare_cached(query).await.map_err(map_err)?;
            let rows = read.query_raw(&stmt, params).await.map_err(map_err)?;
            let mut rows = std::pin::pin!(rows);
            let mut batches = stream::Batcher::new(batch);
            while let Some(row) = rows.try_next().await.map_err(map_err)? {
                if let Some(full) = batches.push(decode(&row)?)
                    && tx.send(full).await.is_err()
                {
                    return Ok(()); // the caller gave up
                }
            }
            if let Some(rest) = batches.rest() {
                let _ = tx.send(rest).await;
            }
            // The connection goes back to the pool only once the query is
            // done.
            read.commit().await.map_err(map_err)
        });
        stream::drain(rx, producer, sink).await
    }
}
