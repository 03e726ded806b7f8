//! The production backend: PostgreSQL through a deadpool connection pool.
//! (Being written; see the conformance suite.)

use crate::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct PostgresStore;

impl PostgresStore {
    pub async fn connect(_url: &str) -> Result<Self> {
        Err(StoreError::internal(
            "the Postgres backend is not built yet",
        ))
    }
}
