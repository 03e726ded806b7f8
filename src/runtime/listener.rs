//! Starting one listener: the one function every listener goes through,
//! given its name, its routes, its concurrency and its TLS.
//!
//! Every listener gets the same transport: outermost [`HttpAnswerLayer`]
//! (a request that is not a gRPC call is answered in HTTP, never with a
//! gRPC status, which is HTTP 200), the connection limits of
//! `transport::connections` (the registry in the accept path, with its cap
//! per client address, and [`ActivityLayer`], outermost of the limits, with
//! one connection's share of the listener's concurrency), then admission
//! ([`AdmissionLayer`]: a request takes a slot of the listener's
//! concurrency, shedding when none is free, only once its message has
//! arrived, and its gRPC framing is checked), the request deadline, the HTTP/2 limits and keepalive pings,
//! TLS when it has it, and Nagle's algorithm off. A listener with gRPC
//! services also serves the standard health service and reflection for
//! what it serves.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use super::shutdown::Shutdown;
use crate::config::{Concurrency, Config, ListenerLimits, MAX_MESSAGE_BYTES};
use crate::proto;
use crate::transport::admission::{AdmissionLayer, AdmissionSettings};
use crate::transport::connections::{ActivityLayer, ConnectionLimits, Connections};
use crate::transport::frames::FrameLimits;
use crate::transport::http_answers::{GrpcServices, HttpAnswerLayer};
use crate::transport::tls::{self, Acceptor};

/// The standard health service, advertised by reflection on every listener
/// with gRPC services.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Largest header block (metadata) of a request, on every listener
/// (`SETTINGS_MAX_HEADER_LIST_SIZE`; hyper's default, stated here).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// One listener to start: see [`super::Runtime::serve`].
#[derive(Debug)]
pub struct Listener {
    /// Names it in log lines ("admin", "verify").
    pub name: &'static str,
    /// The bound socket (see [`bind`]).
    pub socket: TcpListener,
    /// What it serves.
    pub routes: Routes,
    /// Its global concurrency limit and one connection's share of it.
    pub concurrency: Concurrency,
    /// Its TLS, reloaded while serving; `None`: plaintext.
    pub tls: Option<Acceptor>,
}

/// What a listener serves: gRPC services, each reported SERVING by the
/// health service and advertised by reflection, and HTTP routes beside
/// them. Requests are routed by path, as tonic routes them (its routes are
/// an axum router, which the HTTP routes join).
#[derive(Debug, Default)]
pub struct Routes {
    routes: tonic::service::Routes,
    grpc: Vec<&'static str>,
    /// Whether it has HTTP routes: then it also speaks HTTP/1.1.
    http: bool,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a gRPC service.
    pub fn grpc<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.grpc.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Adds HTTP routes. A path neither they nor a gRPC service serve is a
    /// JSON 404 (which a gRPC client reads as UNIMPLEMENTED: a request to
    /// a path no service has is never a call, see `transport::http_answers`).
    pub fn http(mut self, router: axum::Router) -> Self {
        let routes = std::mem::take(&mut self.routes).into_axum_router();
        self.routes = routes.merge(router).fallback(not_found).into();
        self.http = true;
        self
    }

    /// The names of its gRPC services.
    pub fn grpc_services(&self) -> &[&'static str] {
        &self.grpc
    }
}

/// The answer to a path nothing serves.
async fn not_found(request: axum::extract::Request) -> http::Response<axum::body::Body> {
    // A path may hold what a caller should not have put there (a key).
    let path = vilvik_keys_domain::excerpt(request.uri().path());
    let body = serde_json::json!({
        "code": "NOT_FOUND",
        "message": format!("no route serves {path}: see docs/INTEGRATIONS.md"),
    });
    let mut response = http::Response::new(axum::body::Body::from(format!("{body}\n")));
    *response.status_mut() = http::StatusCode::NOT_FOUND;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What every listener of a process shares: the request deadline, the
/// HTTP/2 limits and keepalive pings, and the connection limits.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub request_timeout: Duration,
    pub limits: ListenerLimits,
    pub connections: ConnectionLimits,
    /// Peers to whom the cap per address does not apply.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl ListenerSettings {
    /// `config`'s settings, with `max_connections`, the connection cap
    /// fitted to the descriptor limit, for each listener.
    pub fn new(config: &Config, max_connections: usize) -> Self {
        Self {
            request_timeout: config.request_timeout,
            limits: config.listener_limits,
            connections: ConnectionLimits::new(&config.listener_limits, max_connections),
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    /// A server builder with what every listener shares.
    fn server(&self) -> Server {
        Server::builder()
            .timeout(self.request_timeout)
            .max_concurrent_streams(self.limits.http2_max_concurrent_streams)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(self.limits.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.limits.http2_keepalive_timeout))
    }
}

/// Binds `addr` for the listener named `listener`.
pub async fn bind(addr: SocketAddr, listener: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {listener} API: is another process using it?")
    })
}

/// Starts `listener`: the future that serves it until `shutdown` resolves
/// and its connections have finished, and its connections' registry.
pub(super) fn serve(
    listener: Listener,
    settings: &ListenerSettings,
    health: &HealthReporter,
    shutdown: Shutdown,
) -> anyhow::Result<(
    impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    Connections,
)> {
    let Listener {
        name,
        socket,
        routes: Routes {
            mut routes,
            grpc,
            http,
        },
        concurrency,
        tls,
    } = listener;
    let mut grpc_services = grpc.clone();
    if !grpc.is_empty() {
        // Each listener advertises only what it serves, and can describe.
        let described = described(&grpc);
        let reflection = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            described
                .iter()
                .fold(builder, |builder, service| {
                    builder.with_service_name(*service)
                })
                .with_service_name(HEALTH_SERVICE)
        };
        let health = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        let (v1, v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
        grpc_services.extend([name_of(&health), name_of(&v1), name_of(&v1alpha)]);
        routes = routes
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha);
    }
    // What is a gRPC call: any other request is HTTP, answered in HTTP.
    let grpc_services = GrpcServices::new(grpc_services);
    let addr = socket.local_addr()?;
    let admission = AdmissionLayer::new(AdmissionSettings {
        concurrency: concurrency.limit,
        message_timeout: settings.limits.request_message_timeout,
        budget_bytes: settings.limits.request_message_budget_bytes,
        max_message_bytes: MAX_MESSAGE_BYTES,
        streaming_paths: streaming_paths(&grpc),
    });
    let connections = Connections::new(name, settings.connections, &settings.trusted_proxies);
    tracing::info!(listener = name, %addr, tls = tls_mode(tls.as_ref()), "listening");
    let serving = settings
        .server()
        .accept_http1(http)
        .layer(HttpAnswerLayer::new(
            grpc_services,
            settings.request_timeout,
        ))
        .layer(ActivityLayer::new(concurrency.per_connection))
        .layer(admission)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tls::Incoming::new(
                connections.incoming(incoming(socket)),
                tls,
                name,
                FrameLimits {
                    control_frames_per_second: settings.limits.http2_max_control_frames_per_second,
                    // Every call ends by its deadline.
                    drain_timeout: settings.request_timeout + Duration::from_secs(1),
                },
            ),
            shutdown,
        );
    Ok((serving, connections))
}

/// The full name of a gRPC service.
fn name_of<S: NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// The paths of a listener with gRPC services (`grpc`, health and
/// reflection) whose request is a stream of messages: admission waits only
/// for their first message. Read from the descriptors, so a
/// client-streaming RPC added to the proto needs no list kept by hand.
fn streaming_paths(grpc: &[&'static str]) -> Vec<String> {
    use prost::Message;
    if grpc.is_empty() {
        return Vec::new();
    }
    let sets = [
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut paths = Vec::new();
    for set in sets {
        let set = prost_types::FileDescriptorSet::decode(set).expect("a built-in descriptor set");
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    if method.client_streaming() {
                        paths.push(format!("/{name}/{}", method.name()));
                    }
                }
            }
        }
    }
    paths
}

/// The services of `grpc` that reflection can describe: those of the API's
/// descriptor set. Envoy's Authorization is served but not advertised: the
/// `envoy-types` crate that defines its messages exports no descriptor
/// set, and a service listed but not described only misleads a client.
fn described(grpc: &[&'static str]) -> Vec<&'static str> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
        .expect("a built-in descriptor set");
    let known: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service
                .iter()
                .map(|service| format!("{}.{}", file.package(), service.name()))
        })
        .collect();
    grpc.iter()
        .copied()
        .filter(|name| known.iter().any(|k| k == name))
        .collect()
}

/// How a listener's TLS is described in its "listening" line.
fn tls_mode(tls: Option<&Acceptor>) -> &'static str {
    match tls {
        None => "off",
        Some(tls) if tls.demands_client_certificates() => "mutual",
        Some(_) => "on",
    }
}

/// Accepted connections with Nagle's algorithm off: gRPC answers are small
/// and must not wait for an ACK (tonic's `tcp_nodelay` setting applies only
/// when tonic binds the socket itself).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflection_is_the_only_streaming_request_a_listener_serves() {
        let paths = super::streaming_paths(&["vilvik.keys.v1.KeyAdmin"]);
        assert_eq!(
            paths,
            [
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            ]
        );
        assert!(super::streaming_paths(&[]).is_empty());
    }

    #[test]
    fn reflection_advertises_only_the_services_it_can_describe() {
        let served = [
            "vilvik.keys.v1.KeyVerify",
            "envoy.service.auth.v3.Authorization",
        ];
        assert_eq!(super::described(&served), ["vilvik.keys.v1.KeyVerify"]);
    }
}
