//! The TLS settings, and the files one listener's TLS is made from
//! (`transport::tls` reads them).

use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, invalid};

/// The settings behind [`TlsFiles`], as messages name them.
pub const CERT_SETTING: &str = "tls_cert_file (VILVIK_KEYS_TLS_CERT_FILE)";
pub const KEY_SETTING: &str = "tls_key_file (VILVIK_KEYS_TLS_KEY_FILE)";
pub const CLIENT_CA_SETTING: &str = "admin_client_ca_file (VILVIK_KEYS_ADMIN_CLIENT_CA_FILE)";

/// The TLS settings: one certificate for both listeners, and the CA whose
/// client certificates the admin listener then demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub admin_client_ca_file: Option<PathBuf>,
    /// The CA printed in smoke-test commands (curl's `--cacert`, grpcurl's
    /// `-cacert`).
    pub public_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change (SIGHUP: at once).
    pub reload_interval: Duration,
}

/// The files one listener's TLS is made from; [`CERT_SETTING`],
/// [`KEY_SETTING`] and [`CLIENT_CA_SETTING`] name them in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            admin_client_ca_file: None,
            public_ca_file: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl TlsSettings {
    /// What the `listener` ("admin" or "verify") serves TLS with; `None`:
    /// plaintext.
    pub fn files(&self, listener: &str) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            client_ca: match listener {
                "admin" => self.admin_client_ca_file.clone(),
                _ => None,
            },
        })
    }

    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Settings that make no sense together stop the start.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key_file",
                    "is required with tls_cert_file: set VILVIK_KEYS_TLS_KEY_FILE to the certificate's private key (PEM)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert_file",
                    "is required with tls_key_file: set VILVIK_KEYS_TLS_CERT_FILE to the certificate (PEM)",
                ));
            }
            _ => {}
        }
        if !self.enabled() {
            for (setting, set) in [
                ("admin_client_ca_file", self.admin_client_ca_file.is_some()),
                ("public_ca_file", self.public_ca_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        setting,
                        "needs TLS: set tls_cert_file and tls_key_file (VILVIK_KEYS_TLS_CERT_FILE, VILVIK_KEYS_TLS_KEY_FILE) too",
                    ));
                }
            }
        }
        Ok(())
    }
}
