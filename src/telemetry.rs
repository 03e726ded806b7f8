//! Logging setup, in one place: [`init`] installs the process's subscriber.
//! Field names are chosen where each line is logged, and are written out as
//! given (in JSON, each at the top level of its line): a field about a
//! thing named in it is dotted (`key.id`, `key.prefix`, `pepper.id`,
//! `open_files.limit`), others are plain (`account`, `listener`, `error`,
//! `requests`), and a duration carries its unit (`duration_ms`, `grace_ms`).

use tracing_subscriber::EnvFilter;

use crate::config::{DEFAULT_LOG_FILTER, LogFormat};

/// Installs the global subscriber: `RUST_LOG` filters (default
/// [`DEFAULT_LOG_FILTER`]), output is human-readable or JSON lines.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
