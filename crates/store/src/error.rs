use time::OffsetDateTime;
use vilvik_keys_domain::Tier;

/// What can go wrong in a store call. Business-rule failures carry what the
/// caller needs to explain them; backend failures carry their cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such key")]
    NotFound,
    #[error("the key was revoked at {revoked_at}")]
    Revoked { revoked_at: OffsetDateTime },
    #[error("the key expired at {expires_at}")]
    Expired { expires_at: OffsetDateTime },
    #[error("the account holds {active} active keys; its tier '{tier}' allows {limit}")]
    QuotaExceeded { tier: Tier, limit: u32, active: u32 },
    /// A generated prefix or id collided with an existing one; retry with a new one.
    /// The change log no longer holds every change after the sequence
    /// number asked for: they were pruned. A follower must forget its cache.
    #[error("the change log was pruned through sequence {pruned_through}")]
    ChangesPruned { pruned_through: i64 },
    #[error("a generated identifier is already taken")]
    Conflict,
    /// The database cannot be reached or did not answer in time.
    #[error("the database is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Anything else: a bug, a corrupt row, a failed migration.
    #[error("store failure: {0}")]
    Internal(
        String,
        #[source] Option<Box<dyn std::error::Error + Send + Sync>>,
    ),
}

impl StoreError {
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into(), None)
    }

    pub(crate) fn internal_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Internal(message.into(), Some(Box::new(source)))
    }
}
