//! A real nginx in front of the service, running the configuration of
//! `docs/INTEGRATIONS.md` with only its addresses changed: what reaches
//! the service behind it, and what a client reads, for every answer of
//! the check, and the client's address recorded as the key's last use.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vilvik_keys::config::Config;
use vilvik_keys_test_support::http::{self, Answer, HttpVersion};
use vilvik_keys_test_support::{ACCOUNT, TestApp, on_both_backends};

use crate::doc;
use crate::upstream::{Upstream, header_values};

/// nginx connects to the service from 127.0.0.1, listed as a trusted
/// proxy, as the page says to list the gateway.
fn behind_nginx(config: &mut Config) {
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
}

on_both_backends!(
    configured by behind_nginx:
    the_documented_nginx_passes_only_keys_vilvik_keys_vouches_for,
);

/// The end client connects to nginx from another loopback address, so
/// that the service can tell it from nginx.
const CLIENT: &str = "127.0.0.2";

/// How long a use takes to show on GetKey (the harness flushes usage every
/// 100 ms).
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

async fn the_documented_nginx_passes_only_keys_vilvik_keys_vouches_for(mut app: TestApp) {
    let upstream = Upstream::start().await;
    let nginx = Nginx::start(app.verify_addr, upstream.addr).await;
    let reader = app.create_key("reader", &["datasets:read"]).await.unwrap();
    let reader_id = reader.key.as_ref().unwrap().key_id.clone();
    let bearer = format!("Bearer {}", reader.secret);

    // A valid key with the route's scope reaches the service, which reads
    // who it is from the check, not from what the client sent, and does
    // not see the key.
    let passed = nginx
        .get(
            "/datasets/42?page=2",
            &[
                ("authorization", &bearer),
                ("x-vilvik-key-id", "key_forged"),
                ("x-vilvik-scopes", "keys:admin"),
                ("x-forwarded-for", "198.51.100.99"),
            ],
        )
        .await;
    assert_eq!(passed.status, 200, "{passed:?}");
    let head = &passed.body;
    assert!(
        head.starts_with("GET /datasets/42?page=2 HTTP/"),
        "the service got the request: {head}"
    );
    assert_eq!(header_values(head, "x-vilvik-key-id"), [reader_id.as_str()]);
    assert_eq!(header_values(head, "x-vilvik-account-id"), [ACCOUNT]);
    assert_eq!(header_values(head, "x-vilvik-key-name"), ["reader"]);
    assert_eq!(header_values(head, "x-vilvik-scopes"), ["datasets:read"]);
    assert_eq!(header_values(head, "authorization"), [] as [&str; 0]);
    assert_eq!(upstream.served(), 1);

    // X-API-Key works as well; `/` takes any valid key.
    let passed = nginx
        .get(
            "/",
            &[
                ("x-api-key", &reader.secret),
                ("x-forwarded-for", "198.51.100.99"),
            ],
        )
        .await;
    assert_eq!(passed.status, 200, "{passed:?}");
    assert_eq!(
        header_values(&passed.body, "x-vilvik-key-id"),
        [reader_id.as_str()]
    );
    assert_eq!(header_values(&passed.body, "x-api-key"), [] as [&str; 0]);
    assert_eq!(upstream.served(), 2);

    // The last use names the client, not nginx, and not the address the
    // client wrote in its own X-Forwarded-For.
    app.wait_for_key(
        &reader_id,
        WRITTEN_WITHIN,
        "the use from behind nginx is written",
        |key| key.valid_use_count == 2,
    )
    .await;
    let key = app.get_key(&reader_id).await;
    assert_eq!(key.last_used_observed_ip, CLIENT, "{key:?}");
    assert_eq!(key.last_used_claimed_ip, "");

    // A scope the key lacks: 403, with the challenge naming the route's
    // scopes, and the service sees nothing. The client cannot lower the
    // route's scopes, nor raise them on a route that requires none.
    let refused = nginx
        .get(
            "/billing/invoices",
            &[("authorization", &bearer), ("x-vilvik-required-scopes", "")],
        )
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        refused.header("www-authenticate"),
        "Bearer realm=\"vilvik\", error=\"insufficient_scope\", error_description=\"the key lacks the scopes billing:read, billing:write that this request requires: grant it to the key, or use a key that has it\", scope=\"billing:read billing:write\""
    );
    assert_eq!(refused.header("content-type"), "application/json");
    assert_eq!(refused.json()["code"], "INSUFFICIENT_SCOPE");
    assert_eq!(
        upstream.served(),
        2,
        "the refused request did not reach the service"
    );
    let passed = nginx
        .get(
            "/",
            &[
                ("authorization", &bearer),
                ("x-vilvik-required-scopes", "billing:write"),
            ],
        )
        .await;
    assert_eq!(
        passed.status, 200,
        "the client's scopes are not the route's"
    );
    assert_eq!(
        header_values(&passed.body, "x-vilvik-required-scopes"),
        [] as [&str; 0]
    );
    assert_eq!(upstream.served(), 3);
    let passed = nginx
        .get("/?scope=billing:write", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        passed.status, 200,
        "the client's query does not reach the check"
    );
    assert_eq!(upstream.served(), 4);

    // Keys that are no good: 401 with vilvik-keys' challenge. (The free
    // tier's three active keys: the management key, the reader, this one,
    // which is rotated, then revoked.)
    let rotated = app.create_key("rotated", &["datasets:read"]).await.unwrap();
    let rotated_id = rotated.key.unwrap().key_id;
    let replacement = app.rotate_key(&rotated_id).await.unwrap();
    let passed = nginx
        .get(
            "/datasets/1",
            &[("authorization", &format!("Bearer {}", replacement.secret))],
        )
        .await;
    assert_eq!(passed.status, 200, "the rotation's new secret: {passed:?}");
    assert_eq!(
        header_values(&passed.body, "x-vilvik-key-id"),
        [rotated_id.as_str()]
    );
    assert_eq!(upstream.served(), 5);
    app.revoke_key(&rotated_id).await.unwrap();
    for (what, secret, reason) in [
        ("garbage", "vlk_garbage", "this is not a valid key"),
        (
            "a rotated secret",
            &rotated.secret,
            "this secret was replaced",
        ),
        ("a revoked key", &replacement.secret, "the key was revoked"),
    ] {
        let refused = nginx
            .get(
                "/datasets/1",
                &[("authorization", &format!("Bearer {secret}"))],
            )
            .await;
        assert_eq!(refused.status, 401, "{what}: {refused:?}");
        assert!(
            refused.body.contains("401 Authorization Required"),
            "nginx answers with its own page: {refused:?}"
        );
        let challenge = refused.header("www-authenticate");
        assert!(
            challenge.starts_with(
                "Bearer realm=\"vilvik\", error=\"invalid_token\", error_description=\""
            ) && challenge.contains(reason),
            "{what}: {challenge}"
        );
    }
    assert_eq!(upstream.served(), 5, "no refused key reached the service");

    // No key: 401 with a challenge that has no error. A forged identity
    // does not help.
    let refused = nginx
        .get("/datasets/1", &[("x-vilvik-key-id", reader_id.as_str())])
        .await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(
        refused.header("www-authenticate"),
        "Bearer realm=\"vilvik\""
    );
    assert_eq!(upstream.served(), 5);

    // A location without the check passes no identity, forged or not.
    let public = nginx
        .get("/status", &[("x-vilvik-key-id", "key_forged")])
        .await;
    assert_eq!(public.status, 200, "{public:?}");
    assert_eq!(
        header_values(&public.body, "x-vilvik-key-id"),
        [] as [&str; 0]
    );
    assert_eq!(upstream.served(), 6);

    // vilvik-keys stopped: the route fails closed, as a 503 to retry.
    app.stop().await;
    let unavailable = nginx
        .get("/datasets/1", &[("authorization", &bearer)])
        .await;
    assert_eq!(unavailable.status, 503, "{unavailable:?}");
    assert_eq!(unavailable.header("retry-after"), "1");
    assert_eq!(unavailable.json()["code"], "UNAVAILABLE");
    assert_eq!(upstream.served(), 6, "nothing reached the service");
}

/// nginx, running the page's configuration in the foreground as one
/// process; killed (by its PID) when dropped, its log printed if the test
/// failed.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on a free port of 127.0.0.1, checking keys with the verify
    /// listener at `verify` for the service at `upstream`.
    async fn start(verify: SocketAddr, upstream: SocketAddr) -> Self {
        let binary = nginx_binary();
        let dir = tempfile::tempdir().expect("a directory for nginx");
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        // The page's block with its addresses changed: the verify
        // listener, the service, and a port of 127.0.0.1 to listen on.
        let block = doc::block("nginx");
        let block = doc::replace(
            &block,
            "server 127.0.0.1:50052;",
            &format!("server {verify};"),
        );
        let block = doc::replace(
            &block,
            "server 127.0.0.1:8000;",
            &format!("server {upstream};"),
        );
        let block = doc::replace(&block, "listen 80;", &format!("listen {addr};"));

        // Around it, what the page leaves to nginx.conf: temporary files
        // in the test's directory, no access log.
        let temp = |name: &str| dir.path().join(name).display().to_string();
        let mut paths = format!(
            "client_body_temp_path {};\n    proxy_temp_path {};\n",
            temp("body"),
            temp("proxy")
        );
        let built = nginx_build(&binary);
        for module in ["fastcgi", "uwsgi", "scgi"] {
            if !built.contains(&format!("--without-http_{module}_module")) {
                paths += &format!("    {module}_temp_path {};\n", temp(module));
            }
        }
        let conf = format!(
            "events {{ worker_connections 256; }}\n\nhttp {{\n    access_log off;\n    {paths}\n{block}}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");

        let log = dir.path().join("nginx.stderr");
        let stderr = File::create(&log).expect("nginx's log file");
        let directives = format!(
            "daemon off; master_process off; pid {}; error_log stderr;",
            temp("nginx.pid")
        );
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-e", "stderr", "-g", &directives])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut nginx = Nginx {
            addr,
            child,
            log,
            _dir: dir,
        };
        nginx.wait_until_listening().await;
        nginx
    }

    async fn wait_until_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("nginx's status") {
                panic!(
                    "nginx exited ({status}) instead of serving:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx does not listen on {} after 10 s",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `GET path` with `headers`, sent to nginx by the client.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let client: IpAddr = CLIENT.parse().unwrap();
        http::send_from(
            client,
            self.addr,
            HttpVersion::Http1,
            http::get(path, headers),
        )
        .await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "nginx's log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The nginx binary: `/usr/sbin/nginx` (where Debian puts it, outside a
/// user's PATH), else `nginx` on the PATH. Its absence fails the test.
fn nginx_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin/nginx"))
        .chain(std::env::split_paths(&path).map(|dir| dir.join("nginx")))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed, and these tests run it: install it with \
                 `apt-get install nginx-light` (its auth_request module is what \
                 docs/INTEGRATIONS.md configures)"
            )
        })
}

/// `nginx -V`: its version and how it was built. Fails the test unless it
/// has the auth_request module.
fn nginx_build(binary: &Path) -> String {
    let out = Command::new(binary)
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("running {} -V: {e}", binary.display()));
    let built = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        built.contains("--with-http_auth_request_module"),
        "{} lacks the auth_request module: install Debian's nginx with it, \
         `apt-get install nginx-light`\n{built}",
        binary.display()
    );
    built
}

/// A port of 127.0.0.1 free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
