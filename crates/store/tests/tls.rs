//! Postgres over TLS: `sslmode` and `sslrootcert` in the URL, for the pool
//! and the change listener's connection. Each test starts a
//! cluster of its own with `ssl=on`, serving a certificate that a
//! throwaway CA made here signed, and checks from the server's side
//! (`pg_stat_ssl`, through the cluster's Unix socket) which sessions are
//! encrypted. Nothing is mocked: the refusals are rustls refusing the
//! real server's certificate, or the server refusing a plain client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use vilvik_keys_store::{KeySource, PostgresStore, Store, StoreError};
use vilvik_keys_test_db::fixtures::{account, create, error_chain, now};
use vilvik_keys_test_db::{PrivateCluster, ServerTls};

const DATABASE: &str = "tls";
/// What the store reports when rustls refuses the server's certificate.
const UNTRUSTED: &str = "TLS certificate is not trusted";

/// A throwaway certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (host names or IP addresses).
    fn server_tls(&self, names: &[&str], reject_plain: bool) -> ServerTls {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "vilvik-keys test server");
        let key = KeyPair::generate().unwrap();
        ServerTls {
            cert_pem: params.signed_by(&key, &self.issuer).unwrap().pem(),
            key_pem: key.serialize_pem(),
            reject_plain,
        }
    }
}

/// A TLS cluster with database [`DATABASE`], and in a temp dir the PEM
/// files of the CA that signed its certificate and of another CA.
struct TlsCluster {
    cluster: PrivateCluster,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    _files: tempfile::TempDir,
}

impl TlsCluster {
    /// `None` when no Postgres server is installed and none is required.
    async fn start(names: &[&str], reject_plain: bool) -> Option<TlsCluster> {
        let ca = Ca::new("vilvik-keys test CA");
        let cluster = PrivateCluster::start_with_tls(&ca.server_tls(names, reject_plain))?;
        cluster.create_database(DATABASE).await;
        let files = tempfile::tempdir().unwrap();
        let ca_file = files.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let other_ca_file = files.path().join("other-ca.pem");
        std::fs::write(&other_ca_file, Ca::new("another CA").pem).unwrap();
        Some(TlsCluster {
            cluster,
            ca_file,
            other_ca_file,
            _files: files,
        })
    }

    /// The URL of [`DATABASE`] at `host` with `params` (`k=v&k=v`).
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{DATABASE}?{params}",
            self.cluster.port()
        )
    }

    /// A store on [`DATABASE`] at `host` with `params`, migrated.
    async fn migrated(&self, host: &str, params: &str) -> PostgresStore {
        let store = PostgresStore::connect(&self.url(host, params))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// `application_name` and `pg_stat_ssl.ssl` of every session of
    /// [`DATABASE`], as the server sees them.
    async fn sessions(&self) -> Vec<(String, bool)> {
        let side = self.cluster.client("postgres").await;
        let rows = side
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 ORDER BY 1",
                &[&DATABASE],
            )
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Whether every session named `application` is encrypted; panics
    /// when there is none.
    async fn encrypted(&self, application: &str) -> bool {
        let sessions = self.sessions().await;
        let of_it: Vec<bool> = sessions
            .iter()
            .filter(|(name, _)| name == application)
            .map(|(_, ssl)| *ssl)
            .collect();
        assert!(
            !of_it.is_empty(),
            "no session named {application}: {sessions:?}"
        );
        of_it.iter().all(|ssl| *ssl)
    }
}

fn file_param(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Connecting to `url` fails as a configuration mistake whose chain says
/// `expected`.
async fn refused(url: &str, expected: &str) {
    match PostgresStore::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(err) => {
            let chain = error_chain(&err);
            assert!(matches!(err, StoreError::Internal(..)), "{url}: {chain}");
            assert!(chain.contains(expected), "{url}: {chain}");
        }
    }
}

#[tokio::test]
async fn require_encrypts_the_pool_and_disable_does_not() {
    let Some(tls) = TlsCluster::start(&["localhost", "127.0.0.1"], false).await else {
        return;
    };
    // No sslrootcert: any certificate is taken, as libpq takes it.
    let store = tls.migrated("127.0.0.1", "sslmode=require").await;
    let acme = account("ACME");
    let created = create(&store, &acme, "tls-test", now()).await;
    let read = store.get_key(&acme, &created.key_id).await.unwrap();
    assert_eq!(read.as_ref(), Some(&created));
    assert!(tls.encrypted("vilvik-keys").await);

    // The same server, asked otherwise: the check above tells them apart.
    let _prefer = PostgresStore::connect(&tls.url("127.0.0.1", "application_name=prefer"))
        .await
        .unwrap();
    assert!(tls.encrypted("prefer").await, "prefer takes offered TLS");
    let plain =
        PostgresStore::connect(&tls.url("127.0.0.1", "sslmode=disable&application_name=plain"))
            .await
            .unwrap();
    assert!(!tls.encrypted("plain").await);
    assert_eq!(
        plain.get_key(&acme, &created.key_id).await.unwrap(),
        Some(created)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_connects_and_the_change_feed_runs_over_tls() {
    let Some(tls) = TlsCluster::start(&["localhost", "127.0.0.1"], false).await else {
        return;
    };
    let verify = format!(
        "sslmode=verify-full&sslrootcert={}",
        file_param(&tls.ca_file)
    );
    // The certificate names the address and the host name: both verify.
    let writer = tls.migrated("127.0.0.1", &verify).await;
    let reader = PostgresStore::connect(&tls.url("localhost", &verify))
        .await
        .unwrap();
    let mut listener = reader.listen().await.unwrap().expect("Postgres can push");
    assert!(tls.encrypted("vilvik-keys-listener").await);

    let acme = account("ACME");
    let created = create(&writer, &acme, "tls-test", now()).await;
    let (seq, prefix) = tokio::time::timeout(Duration::from_secs(5), listener.next())
        .await
        .expect("a change within 5 s")
        .expect("the listener is running");
    assert_eq!(prefix, created.prefix);
    assert_eq!(seq, writer.change_sequence().await.unwrap());
    assert_eq!(
        reader.get_key(&acme, &created.key_id).await.unwrap(),
        Some(created)
    );
    assert!(tls.encrypted("vilvik-keys").await);
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let Some(tls) = TlsCluster::start(&["localhost", "127.0.0.1"], false).await else {
        return;
    };
    let other = file_param(&tls.other_ca_file);
    // `require` with a root file verifies the chain too, as in libpq.
    for mode in ["verify-full", "verify-ca", "require"] {
        refused(
            &tls.url("127.0.0.1", &format!("sslmode={mode}&sslrootcert={other}")),
            UNTRUSTED,
        )
        .await;
    }
    let sessions = tls.sessions().await;
    assert!(sessions.is_empty(), "{sessions:?}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host() {
    // Signed by the right CA, but for a name the URL does not use.
    let Some(tls) = TlsCluster::start(&["db.internal.example"], false).await else {
        return;
    };
    let ca = file_param(&tls.ca_file);
    for host in ["127.0.0.1", "localhost"] {
        refused(
            &tls.url(host, &format!("sslmode=verify-full&sslrootcert={ca}")),
            UNTRUSTED,
        )
        .await;
    }
    // verify-ca checks the chain only, and the chain is good.
    let params = format!("sslmode=verify-ca&sslrootcert={ca}");
    let _store = tls.migrated("127.0.0.1", &params).await;
    assert!(tls.encrypted("vilvik-keys").await);
}

#[tokio::test]
async fn a_server_demanding_tls_refuses_sslmode_disable() {
    let Some(tls) = TlsCluster::start(&["localhost", "127.0.0.1"], true).await else {
        return;
    };
    // The server's own words for a client without TLS.
    refused(&tls.url("127.0.0.1", "sslmode=disable"), "no encryption").await;
    let ca = file_param(&tls.ca_file);
    let params = format!("sslmode=verify-full&sslrootcert={ca}");
    let _store = tls.migrated("127.0.0.1", &params).await;
    assert!(tls.encrypted("vilvik-keys").await);
}

#[tokio::test]
async fn a_verifying_mode_without_a_usable_sslrootcert_stops_the_start() {
    // Nothing listens on port 1: these fail before any connection.
    let base = "postgres://alice:hunter2@127.0.0.1:1/keys";
    let missing = "/nonexistent/vilvik-keys/ca.pem";
    for (params, expected) in [
        ("sslmode=verify-full", "sslrootcert"),
        ("sslmode=verify-ca", "sslrootcert"),
        (
            format!("sslmode=verify-full&sslrootcert={missing}").as_str(),
            "cannot read sslrootcert /nonexistent/vilvik-keys/ca.pem",
        ),
        ("sslmode=allow", "sslmode 'allow' is not supported"),
    ] {
        let url = format!("{base}?{params}");
        refused(&url, expected).await;
        let err = PostgresStore::connect(&url).await.unwrap_err();
        let chain = error_chain(&err);
        assert!(chain.contains("DATABASE_URL"), "{chain}");
        assert!(!chain.contains("hunter2"), "{chain}");
    }
}
