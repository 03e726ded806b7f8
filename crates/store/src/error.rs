use time::OffsetDateTime;
use vilvik_keys_domain::{GrantError, KeyId, Tier, TierLimits};

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
    /// `limits` are every tier's, so the caller can point to a larger one.
    #[error("the account holds {active} active keys; its tier '{tier}' allows {limit}")]
    QuotaExceeded {
        tier: Tier,
        limit: u32,
        active: u32,
        limits: TierLimits,
    },
    /// The account already stores as many keys, revoked ones included, as
    /// its tier allows it to keep.
    #[error("the account stores {stored} keys; its tier '{tier}' may keep {limit}")]
    StoredKeysExceeded { tier: Tier, limit: u32, stored: u32 },
    /// The change would grant a scope its caller may not grant.
    #[error("{0}")]
    NotGrantable(GrantError),
    /// The change would leave the account without an active management
    /// key: nobody but the operator could manage its keys again.
    #[error("key {key_id} is the account's last active management key")]
    LastManagementKey { key_id: KeyId },
    /// The change would leave the account, which has a management key
    /// without an expiry, with none: its remaining managers would all
    /// expire, and then nobody but the operator could manage its keys.
    #[error("key {key_id} is the account's last management key without an expiry")]
    LastLastingManager { key_id: KeyId },
    /// The key changed since the version the caller based its change on.
    #[error("key {key_id} is at version {current}, not {expected}")]
    StaleVersion {
        key_id: KeyId,
        expected: i64,
        current: i64,
    },
    /// A request id was used before, within its window, for another call
    /// or with other parameters.
    #[error("the request id was used for a {} with other parameters", method.as_str())]
    RequestIdReused { method: crate::RequestMethod },
    /// A request id recorded within its window by another caller of the
    /// account: its answer is that caller's alone.
    #[error("the request id belongs to another caller")]
    RequestIdNotYours,
    /// The account holds as many request ids within their window as it
    /// may ([`crate::Policy::request_ids_per_account`]).
    #[error("the account holds {limit} request ids within their window")]
    RequestIdsExhausted { limit: u32 },
    /// The change log no longer holds every change after the sequence
    /// number asked for: they were pruned. A follower must forget its cache.
    #[error("the change log was pruned through sequence {pruned_through}")]
    ChangesPruned { pruned_through: i64 },
    /// A generated prefix or id collided with an existing one; retry with a new one.
    #[error("a generated identifier is already taken")]
    Conflict,
    /// The database cannot be reached or did not answer in time.
    #[error("the database is unavailable: {0}")]
    Unavailable(Outage),
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

    /// The store is down in the way `kind` says, because of `source`.
    pub fn unavailable(
        kind: OutageKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unavailable(Outage {
            kind,
            source: source.into(),
        })
    }
}

/// How the store is down: what failed, and the cause as the backend said it.
#[derive(Debug, thiserror::Error)]
#[error("{}", kind.what_is_down())]
pub struct Outage {
    pub kind: OutageKind,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Every way the store can be down or slow. The kind decides what callers
/// are told, above all whether retrying is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageKind {
    /// No pooled connection became free, or no new one was made, in time.
    PoolTimeout,
    /// Connecting failed: nothing listens there, or the network is down.
    ConnectionRefused,
    /// The server is up but does not take connections now (shutting down,
    /// starting, too many clients, `ALLOW_CONNECTIONS false`).
    NotAcceptingConnections,
    /// An open connection broke during the call.
    ConnectionLost,
    /// The connection broke, or the server shut down, while a change was
    /// being committed: it may or may not have been committed.
    CommitUnknown,
    /// The server cancelled a statement: statement or lock timeout,
    /// deadlock, serialization failure. Its transaction was rolled back.
    StatementTimeout,
    /// SQLite: another writer held the file past the busy timeout.
    Busy,
}

impl OutageKind {
    /// One phrase for the caller: what is down.
    pub fn what_is_down(self) -> &'static str {
        match self {
            Self::PoolTimeout => "no database connection became free in time",
            Self::ConnectionRefused => "the database cannot be reached",
            Self::NotAcceptingConnections => "the database is not accepting connections",
            Self::ConnectionLost => "the connection to the database broke during the call",
            Self::CommitUnknown => {
                "the connection to the database broke while the change was being committed"
            }
            Self::StatementTimeout => {
                "the database cancelled the statement (timeout or lock conflict)"
            }
            Self::Busy => "the database file is locked by another writer",
        }
    }

    /// Whether the call certainly changed nothing, so that repeating it
    /// is safe. Only a connection that broke mid-call or mid-commit
    /// leaves that open: the commit may have gone through.
    pub fn nothing_changed(self) -> bool {
        match self {
            Self::PoolTimeout
            | Self::ConnectionRefused
            | Self::NotAcceptingConnections
            | Self::StatementTimeout
            | Self::Busy => true,
            Self::ConnectionLost | Self::CommitUnknown => false,
        }
    }
}
