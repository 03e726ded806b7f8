//! The file-descriptor limit, and the connection cap that fits it.

/// Descriptors kept for everything but client connections (the store's
/// connections and files, the listeners, the runtime) when the connection
/// cap is fitted to the descriptor limit.
const RESERVED_DESCRIPTORS: u64 = 256;
/// Raises the soft limit on open file descriptors to the hard limit, and
/// returns the limit in force afterwards (`None` where it cannot be read).
pub fn raise_descriptor_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open file descriptor limit");
            rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
        }
    }
}

/// The per-listener connection cap that fits `descriptors` for `listeners`
/// listeners, keeping `RESERVED_DESCRIPTORS` for everything else: the
/// configured cap, or less (at least 1) when the limit is too low for it.
pub fn fitted_cap(configured: usize, listeners: usize, descriptors: Option<u64>) -> usize {
    let Some(descriptors) = descriptors else {
        return configured;
    };
    let available = descriptors.saturating_sub(RESERVED_DESCRIPTORS) / listeners.max(1) as u64;
    configured
        .min(usize::try_from(available).unwrap_or(usize::MAX))
        .max(1)
}

/// Raises the descriptor limit to the hard limit, logs it, and returns the
/// per-listener connection cap for `listeners` listeners that fits it.
pub fn fit_connection_cap(configured: usize, listeners: usize) -> usize {
    let descriptors = raise_descriptor_limit();
    let cap = fitted_cap(configured, listeners, descriptors);
    tracing::info!(
        open_files.limit = descriptors,
        max_connections = cap,
        "file descriptor limit raised to the hard limit"
    );
    // The default cap is a ceiling, fitted to the machine without a word;
    // a cap an operator chose and the machine cannot hold is worth one.
    let chosen = configured != crate::config::ListenerLimits::default().max_connections;
    if cap < configured && chosen {
        tracing::warn!(
            open_files.limit = descriptors,
            max_connections = cap,
            configured = configured,
            "the file descriptor limit leaves room for fewer connections per listener than max_connections: \
             raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower max_connections"
        );
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(fitted_cap(10_000, 2, Some(1_048_576)), 10_000);
        assert_eq!(fitted_cap(10_000, 2, Some(4_096)), (4_096 - 256) / 2);
        assert_eq!(fitted_cap(10_000, 1, Some(100)), 1);
        assert_eq!(fitted_cap(10_000, 2, None), 10_000);
    }
}
