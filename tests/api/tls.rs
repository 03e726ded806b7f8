//! TLS on both listeners and mutual TLS on admin, with certificates made
//! in the test by rcgen: a TLS client gets answers, a
//! plaintext client or one trusting another CA gets none, the admin
//! listener wants a client certificate from its CA, renewed certificates
//! are picked up (when the files change, or on SIGHUP) without dropping
//! open connections, the CLI and the printed smoke test work over TLS, and
//! bad files stop the start naming the setting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vilvik_keys::config::Config;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{ListKeysRequest, VerifyCode};
use vilvik_keys::startup::{Application, Role};
use vilvik_keys_test_support::requests::{create, revoke, verify};
use vilvik_keys_test_support::{
    Backend, ServedBinary, StoreSettings, TestApp, bearer, binary, eventually, spawn_app_with,
};

/// A throwaway certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, in PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for this machine's loopback names.
    fn server(&self) -> Pair {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self) -> Pair {
        self.leaf(&["operator.test"], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pair {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The files a server reads its TLS from, in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes the server's certificate and key as `server.pem`/`server.key`.
    fn server(&self, pair: &Pair) {
        self.write("server.key", &pair.key);
        self.write("server.pem", &pair.cert);
    }
}

/// A server on SQLite serving TLS with `server`, and mutual TLS on admin
/// when `client_ca` is given.
async fn tls_app(
    files: &Files,
    server: &Pair,
    client_ca: Option<&Ca>,
    configure: impl FnOnce(&mut Config),
) -> TestApp {
    tls_app_on(Backend::Sqlite, files, server, client_ca, configure)
        .await
        .unwrap()
}

/// [`tls_app`] on `backend`; `None` when it is Postgres and none is
/// configured.
async fn tls_app_on(
    backend: Backend,
    files: &Files,
    server: &Pair,
    client_ca: Option<&Ca>,
    configure: impl FnOnce(&mut Config),
) -> Option<TestApp> {
    files.server(server);
    let client_ca = client_ca.map(|ca| files.write("client-ca.pem", &ca.pem()));
    spawn_app_with(backend, |config| {
        config.tls.cert_file = Some(files.path("server.pem"));
        config.tls.key_file = Some(files.path("server.key"));
        config.tls.admin_client_ca_file = client_ca;
        configure(config);
    })
    .await
}

/// A TLS client trusting `ca`, presenting `identity` when given.
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// VerifyKey over `channel`; `Err` when no answer came back.
async fn verify_over(channel: Result<Channel, String>, key: &str) -> Result<VerifyCode, String> {
    let answer = KeyVerifyClient::new(channel?)
        .verify_key(verify(key, &[]))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(answer.into_inner().code())
}

/// Waits until a new TLS connection to `addr` trusting `ca` is answered.
async fn wait_until_served_by(addr: SocketAddr, ca: &Ca, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let pem = ca.pem();
        async move {
            verify_over(tls_channel(addr, &pem, None).await, "x")
                .await
                .is_ok()
        }
    })
    .await;
}

/// `vilvik-keys serve` on a SQLite file in `files`, serving TLS from
/// `server.pem`/`server.key` and reloading them every `reload`; with the
/// management key bootstrapped for its account.
async fn serve_tls(files: &Files, reload: Duration) -> (ServedBinary, String) {
    let store = StoreSettings::sqlite(files.path("keys.db"));
    binary::migrate(store.env());
    let (management_key, _) = binary::bootstrap(store.env(), "ACME");
    let served = ServedBinary::serve()
        .envs(store.env())
        .env("VILVIK_KEYS_LOG_FORMAT", "json")
        .env("VILVIK_KEYS_TLS_CERT_FILE", files.path("server.pem"))
        .env("VILVIK_KEYS_TLS_KEY_FILE", files.path("server.key"))
        .env(
            "VILVIK_KEYS_TLS_RELOAD_INTERVAL_MS",
            reload.as_millis().to_string(),
        )
        .start()
        .await;
    (served, management_key)
}

/// ListKeys with `credential` over `channel`: how many keys it listed.
async fn list_over(channel: Result<Channel, String>, credential: &str) -> Result<usize, String> {
    let listed = KeyAdminClient::new(channel?)
        .list_keys(bearer(ListKeysRequest::default(), credential))
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(listed.into_inner().keys.len())
}

async fn plaintext_channel(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_is_answered_and_plaintext_or_another_ca_is_refused() {
    let (ca, stranger) = (Ca::new("vilvik test CA"), Ca::new("another CA"));
    let files = Files::new();
    let app = tls_app(&files, &ca.server(), None, |_| {}).await;
    let key = app.management_key.clone();

    for addr in [app.verify_addr, app.admin_addr] {
        let trusted = tls_channel(addr, &ca.pem(), None).await;
        if addr == app.verify_addr {
            assert_eq!(verify_over(trusted, &key).await, Ok(VerifyCode::Valid));
        } else {
            assert_eq!(list_over(trusted, &key).await, Ok(1));
        }

        let plaintext = verify_over(plaintext_channel(addr).await, &key).await;
        assert!(
            plaintext.is_err(),
            "a plaintext client was answered on {addr}: {plaintext:?}"
        );

        let untrusted = verify_over(tls_channel(addr, &stranger.pem(), None).await, &key).await;
        let error = untrusted.expect_err("a client trusting another CA was answered");
        assert!(error.contains("UnknownIssuer"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_demands_a_client_certificate_from_its_ca() {
    let (ca, clients, stranger) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("stranger"),
    );
    let files = Files::new();
    let app = tls_app(&files, &ca.server(), Some(&clients), |_| {}).await;
    let key = app.management_key.clone();
    let admin = app.admin_addr;

    let without = list_over(tls_channel(admin, &ca.pem(), None).await, &key).await;
    assert!(
        without.is_err(),
        "answered without a client certificate: {without:?}"
    );
    let foreign = Some(&stranger.client());
    let wrong = list_over(tls_channel(admin, &ca.pem(), foreign).await, &key).await;
    assert!(
        wrong.is_err(),
        "answered with another CA's client certificate: {wrong:?}"
    );
    let client = clients.client();
    let with = list_over(tls_channel(admin, &ca.pem(), Some(&client)).await, &key).await;
    assert_eq!(with, Ok(1));

    // The verify listener asks for no client certificate.
    let verify = verify_over(tls_channel(app.verify_addr, &ca.pem(), None).await, &key).await;
    assert_eq!(verify, Ok(VerifyCode::Valid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_to_new_connections_without_dropping_open_ones() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new();
    files.server(&old_ca.server());
    let (mut served, key) = serve_tls(&files, Duration::from_millis(50)).await;
    let addr = served.verify_addr();
    let open = tls_channel(addr, &old_ca.pem(), None).await.unwrap();
    assert_eq!(
        verify_over(Ok(open.clone()), &key).await,
        Ok(VerifyCode::Valid)
    );

    // A broken replacement is not taken: once the verify listener has
    // looked at it and said so, the old certificate is still served.
    files.write("server.key", "-----BEGIN PRIVATE KEY-----\nbroken\n");
    let refused = ["TLS files not reloaded", r#""listener":"verify""#];
    served.wait_for_log(&refused, Duration::from_secs(10)).await;
    let still = verify_over(tls_channel(addr, &old_ca.pem(), None).await, &key).await;
    assert_eq!(still, Ok(VerifyCode::Valid));

    files.server(&new_ca.server());
    wait_until_served_by(addr, &new_ca, "new connections get the new certificate").await;
    let old = verify_over(tls_channel(addr, &old_ca.pem(), None).await, &key).await;
    assert!(
        old.is_err(),
        "a new connection still got the old certificate"
    );
    // Reconnecting would fail (the old CA no longer matches): an answer
    // means the connection opened before the renewal is still up.
    assert_eq!(verify_over(Ok(open), &key).await, Ok(VerifyCode::Valid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_at_once() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new();
    files.server(&old_ca.server());
    // Only the signal reloads within this test's time.
    let (mut served, _) = serve_tls(&files, Duration::from_secs(3600)).await;
    let verify = served.verify_addr();
    // Any answer (a malformed key's) means the handshake went through.
    wait_until_served_by(verify, &old_ca, "the server answers over TLS").await;

    files.server(&new_ca.server());
    let before = verify_over(tls_channel(verify, &old_ca.pem(), None).await, "x").await;
    assert_eq!(
        before,
        Ok(VerifyCode::Malformed),
        "reloaded before the signal"
    );

    served.sighup();
    wait_until_served_by(verify, &new_ca, "the signal reloads the certificate").await;
    assert!(served.try_exit().is_none(), "SIGHUP stopped the server");
    // Whatever the timing, the new files were taken on the signal and not
    // before: the log has no reload ahead of the signal's line.
    let log = served.log();
    let signalled = log
        .find("SIGHUP: reloading TLS files")
        .unwrap_or_else(|| panic!("no line about the signal in {log}"));
    let reloaded = log
        .find("TLS certificate reloaded")
        .unwrap_or_else(|| panic!("no reload in {log}"));
    assert!(reloaded > signalled, "reloaded before the signal: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_keys_over_mutual_tls() {
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = Files::new();
    let app = tls_app(&files, &ca.server(), Some(&clients), |_| {}).await;
    let ca_file = files.write("ca.pem", &ca.pem());
    let client = clients.client();
    let client_cert = files.write("client.pem", &client.cert);
    let client_key = files.write("client.key", &client.key);
    let cli = |args: &[&str], identity: bool| {
        let mut command = binary::command();
        command
            .args(args)
            .env("VILVIK_KEYS_ADDR", format!("https://{}", app.admin_addr))
            .env("VILVIK_KEYS_CA_FILE", &ca_file)
            .env("VILVIK_KEYS_TOKEN", &app.management_key);
        if identity {
            command
                .env("VILVIK_KEYS_CLIENT_CERT_FILE", &client_cert)
                .env("VILVIK_KEYS_CLIENT_KEY_FILE", &client_key);
        }
        async move {
            let output = tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap();
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };

    let (ok, stdout, stderr) = cli(
        &[
            "keys",
            "create",
            "--name",
            "over-tls",
            "--scope",
            "datasets:read",
        ],
        true,
    )
    .await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("vlk_"), "{stdout}");
    let (ok, stdout, stderr) = cli(&["keys", "list"], true).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("over-tls"), "{stdout}");

    let (ok, stdout, stderr) = cli(&["keys", "list"], false).await;
    assert!(!ok, "listed without a client certificate: {stdout}");
    assert!(stderr.contains("VILVIK_KEYS_CLIENT_CERT_FILE"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_test_command_runs_as_printed_over_tls() {
    let ca = Ca::new("vilvik test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem());
    let app = tls_app(&files, &ca.server(), None, |config| {
        config.tls.public_ca_file = Some(ca_file.clone());
    })
    .await;
    let mut admin =
        KeyAdminClient::new(tls_channel(app.admin_addr, &ca.pem(), None).await.unwrap());
    let created = admin
        .create_key(app.authed(create("smoke", &["datasets:read"])))
        .await
        .unwrap()
        .into_inner();
    let command = created.smoke_test_command.clone();
    assert!(!command.contains("-plaintext"), "{command}");
    assert!(
        command.contains(&format!("-cacert {}", ca_file.display())),
        "{command}"
    );
    let output = binary::sh(&command).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("VERIFY_CODE_VALID"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curl_smoke_test_command_runs_as_printed_over_tls() {
    let ca = Ca::new("vilvik test CA");
    let files = Files::new();
    // A CA file whose path sh would split: the command quotes it.
    let ca_file = files.write("public ca.pem", &ca.pem());
    let app = tls_app(&files, &ca.server(), None, |config| {
        config.tls.public_ca_file = Some(ca_file.clone());
    })
    .await;
    let mut admin =
        KeyAdminClient::new(tls_channel(app.admin_addr, &ca.pem(), None).await.unwrap());
    let created = admin
        .create_key(app.authed(create("smoke", &["datasets:read"])))
        .await
        .unwrap()
        .into_inner();
    let key_id = created.key.unwrap().key_id;
    let command = created.curl_smoke_test_command;
    assert_eq!(
        command,
        format!(
            "curl -fsS --cacert '{}' -H \"Authorization: Bearer {}\" https://{}/v1/keys/self",
            ca_file.display(),
            created.secret,
            app.verify_addr
        )
    );
    let shown = crate::tour::curl_succeeds(&command).await;
    assert_eq!(shown["key_id"], key_id.as_str());
    assert_eq!(shown["state"], "ACTIVE");

    admin.revoke_key(app.authed(revoke(&key_id))).await.unwrap();
    crate::tour::curl_is_refused(&command, "REVOKED").await;
}

/// The start's error, with its causes, when the server is built with TLS
/// from `files`.
async fn start_error(dir: &Path, tls: impl FnOnce(&mut Config)) -> String {
    let mut config = Config {
        sqlite_path: dir.join("keys.db"),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        verify_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    tls(&mut config);
    match Application::build(config, Role::All).await {
        Ok(_) => panic!("the server started"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_the_start_naming_the_setting() {
    let ca = Ca::new("vilvik test CA");
    let files = Files::new();
    let (server, other) = (ca.server(), ca.server());
    let cert = files.write("server.pem", &server.cert);
    let key = files.write("server.key", &server.key);
    let other_key = files.write("other.key", &other.key);
    let garbage = files.write("garbage.pem", "not a certificate\n");
    let missing = files.path("missing.pem");

    let tls = |cert: &Path, key: &Path, client_ca: Option<&Path>| {
        let (cert, key) = (cert.to_owned(), key.to_owned());
        let client_ca = client_ca.map(Path::to_owned);
        move |c: &mut Config| {
            c.tls.cert_file = Some(cert);
            c.tls.key_file = Some(key);
            c.tls.admin_client_ca_file = client_ca;
        }
    };
    for (tls, needles) in [
        (
            tls(&missing, &key, None),
            &["tls_cert_file", "missing.pem"][..],
        ),
        (
            tls(&cert, &other_key, None),
            &["tls_key_file", "does not match"],
        ),
        (
            tls(&garbage, &key, None),
            &["tls_cert_file", "no PEM certificate"],
        ),
        (tls(&cert, &key, Some(&garbage)), &["admin_client_ca_file"]),
    ] {
        let error = start_error(files.dir.path(), tls).await;
        for needle in needles {
            assert!(error.contains(needle), "{needle}: {error}");
        }
    }
    // Nothing was created on the way to the error.
    assert!(!files.path("keys.db").exists());

    // Half a pair is refused when the settings are read.
    let env = HashMap::from([(
        "VILVIK_KEYS_TLS_CERT_FILE".to_owned(),
        cert.display().to_string(),
    )]);
    let error = Config::from_sources(None, &env).unwrap_err().to_string();
    assert!(error.contains("tls_key_file"), "{error}");
    let env = HashMap::from([(
        "VILVIK_KEYS_ADMIN_CLIENT_CA_FILE".to_owned(),
        cert.display().to_string(),
    )]);
    let error = Config::from_sources(None, &env).unwrap_err().to_string();
    assert!(
        error.contains("admin_client_ca_file") && error.contains("needs TLS"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_closed_at_the_first_request_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = Ca::new("vilvik test CA");
    let files = Files::new();
    let app = tls_app(&files, &ca.server(), None, |config| {
        config.listener_limits.first_request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stalled = tokio::net::TcpStream::connect(app.verify_addr)
        .await
        .unwrap();
    // The first bytes of a TLS record header, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the stalled handshake was not closed: {read:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed too early"
    );
    // The listener still serves others.
    let key = app.management_key.clone();
    let answer = verify_over(tls_channel(app.verify_addr, &ca.pem(), None).await, &key).await;
    assert_eq!(answer, Ok(VerifyCode::Valid));
}

/// A raw HTTP/2 connection over TLS to `addr`, trusting `ca` and presenting
/// `identity`: its request handle, its PING handle and its task (which
/// ends when the server closes the connection).
async fn h2_over_tls(
    addr: SocketAddr,
    ca: &str,
    identity: &Pair,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::PingPong,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(identity.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(identity.key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (client, mut connection) = h2::client::handshake(tls).await.unwrap();
    let ping = connection.ping_pong().unwrap();
    (client, ping, tokio::spawn(connection))
}

/// A health check's HEADERS (its message is sent apart).
fn health_check(addr: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_client_certificate_the_reloaded_ca_refuses_is_closed_after_its_call() {
    let (ca, old_clients, new_clients) = (
        Ca::new("server CA"),
        Ca::new("old client CA"),
        Ca::new("new client CA"),
    );
    let files = Files::new();
    let app = tls_app(&files, &ca.server(), Some(&old_clients), |config| {
        config.tls.reload_interval = Duration::from_millis(50);
    })
    .await;
    let key = app.management_key.clone();
    let admin = app.admin_addr;
    let (old, new) = (old_clients.client(), new_clients.client());

    // A client that calls over one connection, as a long-lived one would.
    let channel = tls_channel(admin, &ca.pem(), Some(&old)).await.unwrap();
    assert_eq!(list_over(Ok(channel.clone()), &key).await, Ok(1));
    // A connection with a call in flight: HEADERS sent, its message not
    // yet. The PING's answer comes after the server has read the HEADERS.
    let (client, mut ping, connection) = h2_over_tls(admin, &ca.pem(), &old).await;
    let (response, mut message) = client
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(health_check(admin), false)
        .unwrap();
    ping.ping(h2::Ping::opaque()).await.unwrap();

    files.write("client-ca.pem", &new_clients.pem());
    eventually(
        Duration::from_secs(10),
        "a client certificate from the new CA is taken",
        || {
            let (pem, key) = (ca.pem(), key.clone());
            let new = &new;
            async move { list_over(tls_channel(admin, &pem, Some(new)).await, &key).await == Ok(1) }
        },
    )
    .await;
    // The connection with the call in flight was told to open no more.
    eventually(
        Duration::from_secs(5),
        "a GOAWAY on the open connection",
        || {
            let client = client.clone();
            async move { client.ready().await.is_err() }
        },
    )
    .await;
    assert!(!connection.is_finished(), "closed with a call in flight");

    // The call in flight finishes, answered...
    message
        .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the call in flight was answered")
        .expect("the call in flight was answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("the call's answer arrived whole");
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // ...then its connection is closed.
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(closed.is_ok(), "the connection stayed open after its call");

    // The long-lived client's connection went the same way, and it cannot
    // come back with the old certificate.
    eventually(
        Duration::from_secs(5),
        "the old certificate's connection gets no answer",
        || {
            let (channel, key) = (channel.clone(), key.clone());
            async move { list_over(Ok(channel), &key).await.is_err() }
        },
    )
    .await;
    let again = list_over(tls_channel(admin, &ca.pem(), Some(&old)).await, &key).await;
    assert!(
        again.is_err(),
        "a new connection with the old CA's certificate was answered: {again:?}"
    );
    let with_new = list_over(tls_channel(admin, &ca.pem(), Some(&new)).await, &key).await;
    assert_eq!(with_new, Ok(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_client_ca_closes_the_old_cas_open_connections() {
    let (ca, old_clients, new_clients) = (
        Ca::new("server CA"),
        Ca::new("old client CA"),
        Ca::new("new client CA"),
    );
    let files = Files::new();
    files.server(&ca.server());
    let client_ca = files.write("client-ca.pem", &old_clients.pem());
    let store = StoreSettings::sqlite(files.path("keys.db"));
    binary::migrate(store.env());
    let (key, _) = binary::bootstrap(store.env(), "ACME");
    // Only the signal reloads within this test's time.
    let mut served = ServedBinary::serve()
        .envs(store.env())
        .env("VILVIK_KEYS_LOG_FORMAT", "json")
        .env("VILVIK_KEYS_TLS_CERT_FILE", files.path("server.pem"))
        .env("VILVIK_KEYS_TLS_KEY_FILE", files.path("server.key"))
        .env("VILVIK_KEYS_ADMIN_CLIENT_CA_FILE", &client_ca)
        .env("VILVIK_KEYS_TLS_RELOAD_INTERVAL_MS", "3600000")
        .start()
        .await;
    let admin = served.admin_addr();
    let old = old_clients.client();
    let channel = tls_channel(admin, &ca.pem(), Some(&old)).await.unwrap();
    assert_eq!(list_over(Ok(channel.clone()), &key).await, Ok(1));

    files.write("client-ca.pem", &new_clients.pem());
    served.sighup();
    served
        .wait_for_log(
            &["refuses this connection's client certificate"],
            Duration::from_secs(10),
        )
        .await;
    eventually(
        Duration::from_secs(5),
        "the old CA's open connection gets no answer",
        || {
            let (channel, key) = (channel.clone(), key.clone());
            async move { list_over(Ok(channel), &key).await.is_err() }
        },
    )
    .await;
    let again = list_over(tls_channel(admin, &ca.pem(), Some(&old)).await, &key).await;
    assert!(
        again.is_err(),
        "answered with the old CA's certificate: {again:?}"
    );
    let new = new_clients.client();
    let with_new = list_over(tls_channel(admin, &ca.pem(), Some(&new)).await, &key).await;
    assert_eq!(with_new, Ok(1));
}

mod http_face {
    use http::StatusCode;
    use vilvik_keys_test_support::http::{HTTP_VERSIONS, get, request, send_tls};

    use super::*;

    vilvik_keys_test_support::on_both_backends!(by backend: the_http_face_answers_over_tls_on_http1_and_http2);

    /// The HTTP face over TLS, HTTP/1.1 and HTTP/2 (negotiated by ALPN),
    /// with our client and with curl; a plaintext request gets nothing.
    async fn the_http_face_answers_over_tls_on_http1_and_http2(backend: Backend) {
        let ca = Ca::new("vilvik test CA");
        let files = Files::new();
        let ca_file = files.write("ca.pem", &ca.pem());
        let Some(app) = tls_app_on(backend, &files, &ca.server(), None, |_| {}).await else {
            return;
        };
        let mut admin =
            KeyAdminClient::new(tls_channel(app.admin_addr, &ca.pem(), None).await.unwrap());
        let created = admin
            .create_key(app.authed(create("tls", &["datasets:read"])))
            .await
            .unwrap()
            .into_inner();
        let (key_id, secret) = (created.key.unwrap().key_id, created.secret);
        let revoked = admin
            .create_key(app.authed(create("gone", &["datasets:read"])))
            .await
            .unwrap()
            .into_inner();
        admin
            .revoke_key(app.authed(revoke(&revoked.key.unwrap().key_id)))
            .await
            .unwrap();
        let addr = app.verify_addr;
        let bearer = format!("Bearer {secret}");
        for version in HTTP_VERSIONS {
            let answer = send_tls(
                addr,
                &ca.pem(),
                "localhost",
                version,
                get("/v1/keys/self", &[("authorization", &bearer)]),
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK, "{version:?} {answer:?}");
            assert_eq!(answer.json()["key_id"], key_id.as_str());
            let gone = send_tls(
                addr,
                &ca.pem(),
                "localhost",
                version,
                get("/v1/authorize", &[("x-api-key", &revoked.secret)]),
            )
            .await;
            assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
            assert!(
                gone.header("www-authenticate")
                    .contains("error=\"invalid_token\"")
            );
            let body = format!(r#"{{"key":"{secret}"}}"#);
            let verified = send_tls(
                addr,
                &ca.pem(),
                "localhost",
                version,
                request(
                    "POST",
                    "/v1/keys:verify",
                    &[("content-type", "application/json")],
                    &body,
                ),
            )
            .await;
            assert_eq!(verified.json()["code"], "VERIFY_CODE_VALID");
        }
        // curl negotiates each version itself.
        let url = format!("https://localhost:{}/v1/keys/self", addr.port());
        for (flag, shown) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let output = binary::sh(&format!(
                "curl -sS {flag} --cacert '{}' -H 'Authorization: {bearer}' -o /dev/null -w '%{{http_version}} %{{http_code}}' {url}",
                ca_file.display()
            ))
            .await;
            assert_eq!(
                String::from_utf8_lossy(&output.stdout),
                format!("{shown} 200"),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // Plaintext on the TLS port is no conversation.
        let output = binary::sh(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{}/healthz",
            addr.port()
        ))
        .await;
        assert!(!output.status.success());
        assert_eq!(String::from_utf8_lossy(&output.stdout), "000");
    }
}
