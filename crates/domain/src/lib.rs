//! The vocabulary of vilvik-keys: what a key looks like, how its secret is
//! hashed (keyed with a pepper) and compared, what a scope grants, and which names, descriptions
//! and expiries are acceptable.
//!
//! This crate does no I/O and knows nothing of gRPC or SQL. Every value here
//! is made through a parser that returns a typed error, so holding one means
//! it is valid ("parse, don't validate"). The server turns these errors into
//! gRPC statuses; the store persists the values.
//!
//! ```
//! use vilvik_keys_domain::{ApiKey, GeneratedKey, Pepper, Peppers};
//!
//! let peppers = Peppers::only(Pepper::generate());
//! let generated = GeneratedKey::generate(peppers.current());
//! // Stored: the prefix, the hash and the pepper's id; handed out once: the secret.
//! let presented: ApiKey = generated.expose_secret().parse().unwrap();
//! assert_eq!(presented.prefix(), generated.prefix());
//! let pepper = peppers.resolve(Some(generated.pepper_id())).unwrap();
//! assert!(generated.hash().matches(&presented.hash_with(pepper)));
//! ```
#![forbid(unsafe_code)]

mod base62;
mod catalogue;
mod clock;
mod echo;
mod fields;
mod ids;
mod key;
mod pepper;
mod request;
mod scope;
mod state;

pub use catalogue::{GrantError, MAX_PATTERNS, PatternError, ScopeCatalogue, ScopePattern};
pub use clock::{Clock, ManualClock, SystemClock, format_time};
pub use echo::{excerpt, looks_like_a_credential, never_echo};
pub use fields::{
    Description, FieldError, KeyName, LabelError, Reason, check_label, validate_expiry,
};
pub use ids::{AccountId, IdError, KeyId};
pub use key::{
    ApiKey, GeneratedKey, KEY_LENGTH, KEY_PREFIX, KeyFormatError, KeyPrefix, SecretHash,
};
pub use pepper::{
    DuplicatePepper, PEPPER_LEN, Pepper, PepperFormatError, PepperId, Peppers, UnknownPepper,
};
pub use request::{
    REQUEST_ID_WINDOW, RequestId, RequestIdError, SealError, open_sealed_secret, seal_secret,
};
pub use scope::{MANAGEMENT_RESOURCE, Scope, ScopeError, ScopeSet};
pub use state::{AuditAction, KeyState, Tier, TierLimits, UnknownAuditAction, UnknownTier};

/// The scope a management key must hold to call the admin API.
pub const ADMIN_SCOPE: &str = "keys:admin";

/// Most scopes one verify may require, on every surface that verifies.
pub const MAX_REQUIRED_SCOPES: usize = 50;
