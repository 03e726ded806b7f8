//! How a failed call reads on the command line: `CODE: message`, with the
//! cause of a transport failure and, when TLS refused the connection, what
//! to set.

use anyhow::anyhow;

use super::output;

/// What to add to a call that failed in transport: over TLS without a
/// client certificate, the likely cause. (A TLS 1.3 server refuses a
/// client's certificate after the client thinks the handshake is done, so
/// the call sees only its connection closing, in one of several ways.)
static TRANSPORT_HINT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Marks this process as talking TLS without a client certificate: a
/// call's transport failure then suggests one.
pub(super) fn hint_client_certificate() {
    let _ = TRANSPORT_HINT.set(
        ": the admin API closed the connection; if it demands client certificates (mutual TLS), \
         set VILVIK_KEYS_CLIENT_CERT_FILE and VILVIK_KEYS_CLIENT_KEY_FILE to one its CA signed",
    );
}

/// A failed call as `CODE: message`; a transport failure (the call never
/// reached the service) with its cause, and a hint when TLS refused it.
pub(super) fn api_error(status: tonic::Status) -> anyhow::Error {
    let code = code_name(status.code());
    let mut message = output::printable(status.message());
    if let Some(source) = std::error::Error::source(&status) {
        let cause = output::printable(&root_cause(source));
        let hint = match tls_hint(&cause) {
            "" => TRANSPORT_HINT.get().copied().unwrap_or_default(),
            hint => hint,
        };
        message = format!("{message} ({cause}){hint}");
    }
    if message.is_empty() {
        anyhow!("{code}")
    } else {
        anyhow!("{code}: {message}")
    }
}

/// The innermost error of a chain, e.g. "Connection refused (os error 111)".
pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// What to do about a TLS alert from the admin API.
pub(super) fn tls_hint(cause: &str) -> &'static str {
    if cause.contains("CertificateRequired") || cause.contains("BadCertificate") {
        ": the admin API wants a client certificate its CA signed; set VILVIK_KEYS_CLIENT_CERT_FILE and VILVIK_KEYS_CLIENT_KEY_FILE"
    } else if cause.contains("UnknownCA") || cause.contains("UnknownIssuer") {
        ": the certificates are signed by a CA the other side does not trust; check VILVIK_KEYS_CA_FILE and the client certificate"
    } else {
        ""
    }
}

/// The canonical name of a gRPC status code, e.g. `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_read_as_words() {
        let err = api_error(tonic::Status::invalid_argument("scopes[0]: bad"));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: scopes[0]: bad");
        assert_eq!(
            api_error(tonic::Status::not_found("")).to_string(),
            "NOT_FOUND"
        );
    }
}
