//! The change log on SQLite: the primitives of [`ChangeRows`], and the
//! streams verify nodes warm their caches from. SQLite has no push
//! channel: followers poll the log.

use rusqlite::{Row, TransactionBehavior, params};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use vilvik_keys_domain::KeyPrefix;

use super::{Sqlite, SqliteStore, map_err, to_micros};
use crate::backend::Sink;
use crate::db::ChangeRows;
use crate::{Result, rows, stream};

impl ChangeRows for Sqlite<'_> {
    async fn change_sequence(&mut self) -> Result<i64> {
        self.query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
            r.get(0)
        })
        .map_err(map_err)
    }

    async fn changes_after(&mut self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        let mut stmt = self
            .prepare_cached(
                "SELECT seq, prefix FROM key_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(map_err)?;
        stmt.query_map(params![seq, i64::from(limit)], |row| Ok(rows::change(row)))
            .map_err(map_err)?
            .map(|change| change.map_err(map_err)?)
            .collect()
    }

    async fn change_floor(&mut self) -> Result<i64> {
        self.prepare_cached("SELECT pruned_through FROM change_log_floor")
            .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
            .map_err(map_err)
    }

    async fn publish_change(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> Result<()> {
        self.prepare_cached("INSERT INTO key_changes (prefix, at) VALUES (?1, ?2)")
            .map_err(map_err)?
            .execute(params![prefix.as_str(), to_micros(at)])
            .map_err(map_err)?;
        Ok(())
    }

    /// The write lock `BEGIN IMMEDIATE` took keeps every publisher out.
    async fn lock_change_log(&mut self) -> Result<()> {
        Ok(())
    }

    async fn last_prunable_change(&mut self, before: OffsetDateTime) -> Result<Option<i64>> {
        self.query_row(
            "SELECT MAX(seq) FROM key_changes \
             WHERE at < ?1 AND seq < (SELECT MAX(seq) FROM key_changes)",
            params![to_micros(before)],
            |r| r.get(0),
        )
        .map_err(map_err)
    }

    async fn delete_changes_through(&mut self, seq: i64) -> Result<u64> {
        self.execute("DELETE FROM key_changes WHERE seq <= ?1", params![seq])
            .map(|n| n as u64)
            .map_err(map_err)
    }

    async fn set_change_floor(&mut self, floor: i64) -> Result<()> {
        self.execute(
            "UPDATE change_log_floor SET pruned_through = ?1",
            params![floor],
        )
        .map_err(map_err)?;
        Ok(())
    }
}

impl SqliteStore {
    /// One statement on the reader connection inside a read transaction,
    /// run on a blocking thread that sends batches to the caller as it
    /// goes. Other reads of this store wait until the stream ends (the
    /// reader connection is busy); writes do not (WAL).
    pub(super) async fn stream_rows<T: Send + 'static>(
        &self,
        query: &'static str,
        params: Vec<rusqlite::types::Value>,
        batch: usize,
        decode: fn(&Row<'_>) -> Result<T>,
        sink: Sink<'_, T>,
    ) -> Result<usize> {
        let (tx, rx) = mpsc::channel(stream::BUFFERED_BATCHES);
        let conn = self.reader.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            // Deferred: a read transaction, one snapshot for every row.
            let read = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(map_err)?;
            {
                let mut stmt = read.prepare_cached(query).map_err(map_err)?;
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params))
                    .map_err(map_err)?;
                let mut batches = stream::Batcher::new(batch);
                while let Some(row) = rows.next().map_err(map_err)? {
                    if let Some(full) = batches.push(decode(row)?)
                        && tx.blocking_send(full).is_err()
                    {
                        return Ok(()); // the caller gave up
                    }
                }
                if let Some(rest) = batches.rest()
                    && tx.blocking_send(rest).is_err()
                {
                    return Ok(());
                }
            }
            read.commit().map_err(map_err)
        });
        stream::drain(rx, producer, sink).await
    }
}
