//! The one place where failures become gRPC statuses.

use tonic::{Code, Status};
use vilvik_keys_store::StoreError;

/// Why an API call failed, in terms the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong; `field` names it as in the proto.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the key store is unavailable; retry shortly")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn key_not_found(key_id: &impl std::fmt::Display) -> Self {
        Self::NotFound(format!("key {key_id} not found in this account"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(e),
            _ => ApiError::Internal(e),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        if let ApiError::Unavailable(source) | ApiError::Internal(source) = &e {
            // The caller gets an opaque message; the cause chain is logged once here.
            tracing::error!(error = %error_chain(source), "request failed");
        }
        Status::new(code, e.to_string())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
