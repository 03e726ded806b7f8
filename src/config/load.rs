//! Loading: the TOML file, then the environment over it, through the
//! settings table; then the checks that span several settings.

use std::collections::HashMap;
use std::path::Path;

use super::Config;
use super::error::{ConfigError, invalid};
use super::settings::{FileConfig, SETTINGS, apply_settings};

impl Config {
    /// Reads `file` (when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_sources(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment; for tests.
    pub fn from_sources(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        reject_unknown_variables(env)?;
        let file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                parse_file(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::from_parts(file, env)
    }

    /// Like [`Config::from_sources`] with the file's text already read;
    /// `path` only names it in messages. For the fuzz targets in `fuzz/`.
    pub fn from_file_text(
        path: &Path,
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        reject_unknown_variables(env)?;
        Self::from_parts(parse_file(path, text)?, env)
    }

    fn from_parts(file: FileConfig, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        apply_settings(&mut config, file, env)?;
        if config.tier_limits.premium < config.tier_limits.free {
            return Err(invalid(
                "premium_tier_limit",
                format!(
                    "premium ({}) must allow at least as many keys as free ({})",
                    config.tier_limits.premium, config.tier_limits.free
                ),
            ));
        }
        config
            .listener_limits
            .check(config.verify_concurrency_limit)?;
        config.tls.check()?;
        Ok(config)
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })
}

/// A misspelt variable would otherwise be ignored silently: every
/// `VILVIK_KEYS_*` variable must be one of [`SETTINGS`].
fn reject_unknown_variables(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut unknown: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("VILVIK_KEYS_") && !SETTINGS.iter().any(|s| s.env == *name))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(name) => Err(invalid(
            name,
            format!(
                "unknown setting; the known ones are listed in the README (is it misspelt?){}",
                if unknown.len() > 1 {
                    format!(" (also unknown: {})", unknown[1..].join(", "))
                } else {
                    String::new()
                }
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{env, file, refusal, refusal_of_file};
    use super::*;

    #[test]
    fn environment_wins_over_the_file() {
        let f = file("admin_addr = \"127.0.0.1:6000\"\nfree_tier_limit = 5\n");
        let c = Config::from_sources(
            Some(f.path()),
            &env(&[("VILVIK_KEYS_ADMIN_ADDR", "127.0.0.1:7000")]),
        )
        .unwrap();
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:7000");
        assert_eq!(c.tier_limits.free, 5);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let err = refusal_of_file("admin_adr = \"127.0.0.1:6000\"\n");
        assert!(err.contains("admin_adr"), "{err}");
    }

    #[test]
    fn misspelt_variables_stop_the_start() {
        let err = refusal(&[("VILVIK_KEYS_ADMINADDR", "127.0.0.1:1")]);
        assert!(
            err.starts_with("VILVIK_KEYS_ADMINADDR: unknown setting"),
            "{err}"
        );
        assert!(Config::from_sources(None, &env(&[("VILVIK_KEYS_TOKEN", "x")])).is_ok());
    }

    #[test]
    fn every_declared_variable_is_accepted() {
        let all: Vec<(&str, &str)> = SETTINGS
            .iter()
            .filter(|s| s.env.starts_with("VILVIK_KEYS_"))
            .map(|s| (s.env, ""))
            .collect();
        assert!(Config::from_sources(None, &env(&all)).is_ok());
    }
}
