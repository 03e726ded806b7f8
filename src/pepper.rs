//! Pepper files: reading the configured ones, and making the default one.
//!
//! A pepper file holds 64 hex characters (32 secret bytes; whitespace
//! around them is ignored) and must be private to the service's user
//! (no permission bits for group or others): anything else stops the start
//! with a message naming the setting and the path, never the content.
//! `pepper_file` is the current pepper; `pepper_files` lists older ones
//! whose keys still verify (see `docs/SECURITY.md`, "Rotating the pepper").
//!
//! Without `pepper_file`, the pepper is `<sqlite_path>.pepper` beside the
//! SQLite database, or `vilvik-keys.pepper` in the working directory on
//! Postgres, generated (0600) on the first start and reused after. On
//! Postgres every node must be given the same file, so the service warns
//! when it relies on the default; and a node whose default file is missing
//! while the database already holds keys hashed with a pepper refuses to
//! start (it would otherwise make a pepper of its own, and neither its keys
//! nor the others' would verify everywhere).

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use vilvik_keys_domain::{Pepper, Peppers};
use vilvik_keys_store::Store;
use zeroize::Zeroizing;

use crate::config::Config;

/// The current pepper's setting, as messages name it.
pub const CURRENT_SETTING: &str = "pepper_file (VILVIK_KEYS_PEPPER_FILE)";
/// The older peppers' setting, as messages name it.
pub const OLDER_SETTING: &str = "pepper_files (VILVIK_KEYS_PEPPER_FILES)";
/// The default pepper file on Postgres, in the working directory.
pub const POSTGRES_DEFAULT_FILE: &str = "vilvik-keys.pepper";

/// The most of a pepper file read: a pepper and generous whitespace.
const MAX_FILE_BYTES: u64 = 4096;

/// The current pepper's file: the configured one, or the default.
pub fn current_file(config: &Config) -> (PathBuf, bool) {
    match &config.pepper_file {
        Some(path) => (path.clone(), true),
        None => (default_file(config), false),
    }
}

/// Where the pepper is when `pepper_file` is not set: beside the SQLite
/// file, or in the working directory on Postgres.
pub fn default_file(config: &Config) -> PathBuf {
    match config.database_url() {
        Some(_) => PathBuf::from(POSTGRES_DEFAULT_FILE),
        None => {
            let mut name = config.sqlite_path.as_os_str().to_owned();
            name.push(".pepper");
            PathBuf::from(name)
        }
    }
}

/// Reads the pepper in `path`, named by `setting` in any error.
pub fn read(path: &Path, setting: &str) -> anyhow::Result<Pepper> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{setting}: cannot read the pepper file {shown}"))?;
    if !meta.is_file() {
        bail!("{setting}: {shown} is not a file; it must hold a pepper (64 hex characters)");
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{setting}: the pepper file {shown} may be read or written by others (mode {mode:03o}): \
             it must be private to the service's user; run `chmod 600 {shown}`"
        );
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("{setting}: cannot read the pepper file {shown}"))?;
    // Room for the whole read up front: the buffer never moves, so the one
    // copy of the text is the one zeroed.
    let mut text = Zeroizing::new(Vec::with_capacity(MAX_FILE_BYTES as usize + 1));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .with_context(|| format!("{setting}: cannot read the pepper file {shown}"))?;
    Pepper::from_hex(&text).map_err(|e| {
        anyhow::anyhow!(
            "{setting}: the pepper file {shown} does not hold a pepper: {e}; \
             make one with `vilvik-keys pepper new PATH`"
        )
    })
}

/// Why [`create`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(
        "{0} already exists: refusing to overwrite it (keys hashed with the pepper in it would stop verifying)"
    )]
    Exists(PathBuf),
    #[error("cannot write the pepper file {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// Writes a new pepper to `path`, which must not exist: mode 0600 whatever
/// the umask. Written to a temporary file beside it first and linked into
/// place, so another process never reads a partial pepper, and of two
/// processes making it at once one wins and the other sees it exists.
pub fn create(path: &Path) -> Result<Pepper, CreateError> {
    let io = |e| CreateError::Io(path.to_owned(), e);
    let pepper = Pepper::generate();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("the path names no file")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{}.tmp", std::process::id(), nanos()));
    let tmp = dir.join(tmp_name);
    let written = write_private(&tmp, &pepper.to_hex());
    let placed = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match placed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CreateError::Exists(path.to_owned()));
        }
        // No hard links here (some file systems): write it in place.
        Err(_) => match write_private(path, &pepper.to_hex()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CreateError::Exists(path.to_owned()));
            }
            Err(e) => return Err(io(e)),
        },
    }
    // The new name is durable once its directory is.
    if let Ok(dir) = std::fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(pepper)
}

/// A new file holding `text`, owner read and write only, synced.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask can only take bits away; this puts back exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The peppers a serving node (or `bootstrap`) uses: the configured files,
/// or the default file, made on the first start. `store` is asked only
/// when the default file is missing (see the module docs).
pub async fn load(config: &Config, store: &dyn Store) -> anyhow::Result<Peppers> {
    let (path, configured) = current_file(config);
    let current = if configured {
        read(&path, CURRENT_SETTING)?
    } else {
        default_pepper(config, &path, store).await?
    };
    let mut older = Vec::with_capacity(config.pepper_files.len());
    for file in &config.pepper_files {
        older.push(read(file, OLDER_SETTING)?);
    }
    let older_ids: Vec<String> = older.iter().map(|p| p.id().to_string()).collect();
    let current_id = current.id();
    let peppers = Peppers::new(current, older).map_err(|dup| {
        let file_at = |position: usize| match position {
            0 => (path.as_path(), CURRENT_SETTING),
            n => (config.pepper_files[n - 1].as_path(), OLDER_SETTING),
        };
        let (first, first_setting) = file_at(dup.first);
        let (again, _) = file_at(dup.again);
        anyhow::anyhow!(
            "{OLDER_SETTING}: {} holds the same pepper ({}) as {} ({first_setting}): list each pepper once",
            again.display(),
            dup.id,
            first.display()
        )
    })?;
    tracing::info!(
        pepper.id = %current_id,
        pepper.file = %path.display(),
        pepper.older = ?older_ids,
        "peppers loaded"
    );
    Ok(peppers)
}

/// The default pepper file's pepper: read it, or make it when missing and
/// the database holds no key hashed with a pepper.
async fn default_pepper(config: &Config, path: &Path, store: &dyn Store) -> anyhow::Result<Pepper> {
    let on_postgres = config.database_url().is_some();
    if on_postgres {
        tracing::warn!(
            pepper.file = %path.display(),
            "pepper_file is not set: using a pepper file in the working directory; every node \
             must be given the same file (set pepper_file / VILVIK_KEYS_PEPPER_FILE on each, e.g. \
             from a secret), or keys made on one node do not verify on the others"
        );
    }
    if std::fs::symlink_metadata(path).is_ok() {
        let pepper = read(path, CURRENT_SETTING)?;
        tracing::info!(pepper.file = %path.display(), pepper.id = %pepper.id(), "using the pepper file");
        return Ok(pepper);
    }
    let keyed: Vec<String> = store
        .secrets_by_pepper()
        .await
        .context("cannot check whether the database already holds peppered keys")?
        .into_iter()
        .filter_map(|u| u.pepper_id.map(|id| id.to_string()))
        .collect();
    if !keyed.is_empty() {
        bail!(
            "{CURRENT_SETTING} is not set and {} does not exist, but the database holds keys \
             hashed with pepper {}: without that pepper they cannot verify. Restore its file \
             there, or set pepper_file to it{}",
            path.display(),
            keyed.join(", "),
            if on_postgres {
                "; every node must be given the same file"
            } else {
                ""
            }
        );
    }
    match create(path) {
        Ok(pepper) => {
            tracing::info!(
                pepper.file = %path.display(),
                pepper.id = %pepper.id(),
                "generated a new pepper (mode 0600): keep it with the database's backups, but apart from them"
            );
            Ok(pepper)
        }
        // Another process (a `bootstrap`, another node) made it meanwhile.
        Err(CreateError::Exists(_)) => read(path, CURRENT_SETTING),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "{CURRENT_SETTING} is not set and the default pepper file cannot be made"
        ))),
    }
}

/// The retired peppers' setting, as messages name it.
pub const RETIRED_SETTING: &str = "retired_peppers (VILVIK_KEYS_RETIRED_PEPPERS)";

/// Refuses to serve when live keys (see [`vilvik_keys_store::PepperUse`])
/// are hashed with a pepper this node was not given: every one of them,
/// management keys included, would answer NOT_FOUND, and nothing but the
/// first verify of each would say why. Peppers listed in `retired_peppers`
/// were retired on purpose: their keys only get a warning.
pub async fn check_live_keys(
    config: &Config,
    peppers: &Peppers,
    store: &dyn Store,
) -> anyhow::Result<()> {
    let uses = store
        .secrets_by_pepper()
        .await
        .context("cannot count the live keys per pepper")?;
    let mut missing = Vec::new();
    let mut retired = Vec::new();
    for u in uses.iter().filter(|u| u.live > 0) {
        let Some(id) = u.pepper_id else {
            continue; // legacy unkeyed hashes need no pepper
        };
        if peppers.resolve(Some(id)).is_ok() {
            continue;
        }
        let line = format!("{} live key(s) with pepper {id}", u.live);
        if config.retired_peppers.contains(&id) {
            retired.push(line);
        } else {
            missing.push(line);
        }
    }
    missing.sort();
    retired.sort();
    if !retired.is_empty() {
        tracing::warn!(
            keys = %retired.join(", "),
            "live keys are hashed with peppers listed in retired_peppers: they answer NOT_FOUND"
        );
    }
    if !missing.is_empty() {
        let (current, _) = current_file(config);
        bail!(
            "refusing to start: live keys are hashed with peppers this node is not given: {} (its \
             current pepper is {} from {}). They would all answer NOT_FOUND, management keys \
             included. Give the \
             node those peppers' files, in {CURRENT_SETTING} or {OLDER_SETTING} (`vilvik-keys \
             pepper status` shows what each pepper covers); or, to retire them on purpose, list \
             their ids in {RETIRED_SETTING}",
            missing.join(", "),
            peppers.current().id(),
            current.display()
        );
    }
    Ok(())
}

/// The configured peppers, for `pepper status`: nothing is made. The
/// current one is `None` when `pepper_file` is unset and the default file
/// does not exist yet.
#[derive(Debug)]
pub struct Configured {
    pub current: Option<(PathBuf, Pepper)>,
    pub current_file: PathBuf,
    pub older: Vec<(PathBuf, Pepper)>,
}

pub fn configured(config: &Config) -> anyhow::Result<Configured> {
    let (path, configured) = current_file(config);
    let current = if configured || std::fs::symlink_metadata(&path).is_ok() {
        Some((path.clone(), read(&path, CURRENT_SETTING)?))
    } else {
        None
    };
    let older = config
        .pepper_files
        .iter()
        .map(|file| Ok((file.clone(), read(file, OLDER_SETTING)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Configured {
        current,
        current_file: path,
        older,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_created_pepper_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pepper");
        let pepper = create(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read(&path, CURRENT_SETTING).unwrap().id(), pepper.id());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65, "64 hex characters and a newline");
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pepper");
        let first = create(&path).unwrap();
        let err = create(&path).unwrap_err();
        assert!(matches!(err, CreateError::Exists(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(read(&path, CURRENT_SETTING).unwrap().id(), first.id());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_pepper_files_are_refused_naming_the_setting_and_path_never_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let secret_looking = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde";
        let cases: [(&str, &str, u32, &str); 5] = [
            ("short", secret_looking, 0o600, "64 hex characters"),
            (
                "nothex",
                &format!("{secret_looking}x"),
                0o600,
                "only the hex characters",
            ),
            ("empty", "", 0o600, "holds 0 characters"),
            ("shared", &format!("{secret_looking}0"), 0o640, "chmod 600"),
            ("public", &format!("{secret_looking}0"), 0o604, "mode 604"),
        ];
        for (name, text, file_mode, needle) in cases {
            let path = dir.path().join(name);
            write(&path, text, file_mode);
            let err = read(&path, OLDER_SETTING).unwrap_err().to_string();
            assert!(err.starts_with(OLDER_SETTING), "{name}: {err}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(err.contains(needle), "{name}: {err}");
            assert!(!err.contains("0123456789abcdef"), "{name}: {err}");
        }
        let missing = dir.path().join("missing");
        let err = format!("{:#}", read(&missing, CURRENT_SETTING).unwrap_err());
        assert!(err.starts_with(CURRENT_SETTING), "{err}");
        assert!(
            err.contains("missing") && err.contains("No such file"),
            "{err}"
        );
        let err = read(dir.path(), CURRENT_SETTING).unwrap_err().to_string();
        assert!(err.contains("is not a file"), "{err}");
    }

    #[test]
    fn surrounding_whitespace_is_ignored_and_either_case_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let hex = "00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff";
        write(&path, &format!("\n  {hex}\r\n\n"), 0o400);
        let pepper = read(&path, CURRENT_SETTING).unwrap();
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        assert_eq!(pepper.id(), Pepper::from_bytes(&bytes).id());
    }

    #[test]
    fn the_default_file_is_beside_the_sqlite_file_or_in_the_working_directory() {
        let mut config = Config {
            sqlite_path: PathBuf::from("/var/lib/vilvik/keys.db"),
            ..Config::default()
        };
        assert_eq!(
            current_file(&config),
            (PathBuf::from("/var/lib/vilvik/keys.db.pepper"), false)
        );
        config.database_url = Some("postgres://db/keys".to_owned().into());
        assert_eq!(
            current_file(&config),
            (PathBuf::from("vilvik-keys.pepper"), false)
        );
        config.pepper_file = Some(PathBuf::from("/run/secrets/pepper"));
        assert_eq!(
            current_file(&config),
            (PathBuf::from("/run/secrets/pepper"), true)
        );
    }
}
