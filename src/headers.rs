//! The request and response headers (gRPC metadata) of the API, named once
//! for the server, the CLI and the tools. Their meaning: `docs/API.md`.

/// With the operator token: the account the call acts on.
pub const ACCOUNT: &str = "x-vilvik-account";

/// With the operator token: the person the audit log names as the actor.
pub const ACTOR: &str = "x-vilvik-actor";

/// A create's or rotation's request id, instead of its `request_id` field.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// On a call refused by the admin rate limit: whole seconds to wait.
pub const RETRY_AFTER: &str = "retry-after";

/// On a call refused by the admin rate limit: milliseconds to wait.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
