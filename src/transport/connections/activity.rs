//! Each request's start and end on its connection: what tonic puts in a
//! request's extensions for a tracked connection ([`ConnectionInfo`], read
//! by [`peer_addr`]), and [`ActivityLayer`], which marks requests through
//! it and holds each connection to its share of the listener's concurrency.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::registry::{Connection, Registry, Stage};
use super::tracked::Tracked;

/// What tonic puts in each request's extensions for a tracked connection:
/// [`ActivityLayer`] marks the request on its connection through it, and
/// [`peer_addr`] reads the peer's address from it (tonic's own
/// `Request::remote_addr` only knows its own connection types).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub(super) tcp: TcpConnectInfo,
    pub(super) activity: Activity,
}

impl ConnectionInfo {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.remote_addr()
    }
}

/// The address of the peer that sent `request`.
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    peer_addr_in(request.extensions()).or_else(|| request.remote_addr())
}

/// The peer's address, from an HTTP request's extensions on a listener's
/// tracked connection.
pub fn peer_addr_in(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<ConnectionInfo>()
        .and_then(|info| info.tcp.remote_addr())
}

impl Connected for Tracked<TcpStream> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            tcp: self.io.connect_info(),
            activity: Activity {
                connection: self.connection.clone(),
                registry: self.registry.clone(),
            },
        }
    }
}

/// A handle through which requests tell their connection they run.
#[derive(Debug, Clone)]
pub(super) struct Activity {
    pub(super) connection: Arc<Connection>,
    pub(super) registry: Arc<Registry>,
}

impl Activity {
    /// Marks a request started, unless `limit` requests already run on
    /// this connection (then `None`: shed it).
    pub(super) fn request(&self, limit: usize) -> Option<RequestGuard> {
        let first = {
            let mut state = self.connection.state();
            if state.in_flight >= limit {
                return None;
            }
            state.in_flight += 1;
            state.stage != Stage::Used
        };
        if first {
            self.registry.used(&self.connection);
        }
        Some(RequestGuard(self.connection.clone()))
    }
}

/// One request in progress on a connection, until dropped.
#[derive(Debug)]
pub(super) struct RequestGuard(Arc<Connection>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }
}

/// A tower layer marking each request's start and end on its connection
/// (found through the request's [`ConnectionInfo`]), and holding each
/// connection to its share of the listener's concurrency: a request beyond
/// `per_connection` running on its connection is shed at once
/// (RESOURCE_EXHAUSTED), so one connection cannot take the listener's
/// whole limit. It must be outside every layer that limits (only
/// `http_answers`, which answers HTTP requests in HTTP, comes before it),
/// so that a request shed by a limit below still counts as the connection
/// being used.
#[derive(Debug, Clone, Copy)]
pub struct ActivityLayer {
    per_connection: usize,
}

impl ActivityLayer {
    pub fn new(per_connection: usize) -> Self {
        Self { per_connection }
    }
}

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Active<S>;

    fn layer(&self, inner: S) -> Active<S> {
        Active {
            inner,
            per_connection: self.per_connection,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Active<S> {
    inner: S,
    per_connection: usize,
}

impl<S, B> tower::Service<http::Request<B>> for Active<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: From<tower::BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ActiveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = match request.extensions().get::<ConnectionInfo>() {
            Some(info) => match info.activity.request(self.per_connection) {
                Some(guard) => Some(guard),
                None => return ActiveFuture::Shed,
            },
            None => None,
        };
        ActiveFuture::Running {
            inner: self.inner.call(request),
            _guard: guard,
        }
    }
}

pin_project_lite::pin_project! {
    #[project = ActiveProj]
    #[derive(Debug)]
    pub enum ActiveFuture<F> {
        Running {
            #[pin]
            inner: F,
            _guard: Option<RequestGuard>,
        },
        /// Beyond the connection's share: answered at once.
        Shed,
    }
}

impl<F, T, E> Future for ActiveFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<tower::BoxError>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            ActiveProj::Running { inner, .. } => inner.poll(cx),
            // tonic answers an `Overloaded` error RESOURCE_EXHAUSTED.
            ActiveProj::Shed => Poll::Ready(Err(E::from(Box::new(
                tower::load_shed::error::Overloaded::new(),
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tower::{Layer, Service, ServiceExt};

    use super::super::testing::{activity, connect, connections};
    use super::*;

    #[tokio::test]
    async fn the_layer_marks_requests_and_the_peer_address_stays_readable() {
        let connections = connections(10);
        let (tracked, _client) = connect(&connections);
        let peer: SocketAddr = "192.0.2.7:4711".parse().unwrap();
        let info = ConnectionInfo {
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            },
            activity: activity(&tracked),
        };
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let mut release = Some(release_rx);
        let mut service =
            ActivityLayer::new(usize::MAX).layer(tower::service_fn(move |r: http::Request<()>| {
                let seen = peer_addr(&tonic::Request::from_http(r));
                let release = release.take();
                async move {
                    if let Some(release) = release {
                        let _ = release.await;
                    }
                    Ok::<_, tower::BoxError>(seen)
                }
            }));
        let mut request = http::Request::new(());
        request.extensions_mut().insert(info);
        let call = service.ready().await.unwrap().call(request);
        assert_eq!(tracked.connection.state().in_flight, 1);
        assert_eq!(tracked.connection.state().stage, Stage::Used);
        release_tx.send(()).unwrap();
        assert_eq!(call.await.unwrap(), Some(peer));
        assert_eq!(tracked.connection.state().in_flight, 0);
    }

    #[tokio::test]
    async fn requests_beyond_the_connections_share_are_shed_at_once() {
        let connections = connections(10);
        let (tracked, _client) = connect(&connections);
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut service =
            ActivityLayer::new(2).layer(tower::service_fn(move |_: http::Request<()>| {
                let mut release = release_rx.clone();
                async move {
                    let _ = release.wait_for(|go| *go).await;
                    Ok::<_, tower::BoxError>(())
                }
            }));
        let request = || {
            let mut request = http::Request::new(());
            request.extensions_mut().insert(ConnectionInfo {
                tcp: TcpConnectInfo {
                    local_addr: None,
                    remote_addr: None,
                },
                activity: activity(&tracked),
            });
            request
        };
        let first = service.ready().await.unwrap().call(request());
        let second = service.ready().await.unwrap().call(request());
        let shed = service.ready().await.unwrap().call(request()).await;
        let err = shed.expect_err("a third request on a connection with a share of 2");
        assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");
        release_tx.send(true).unwrap();
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(tracked.connection.state().in_flight, 0);
        // With room again, requests run.
        service
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
    }
}
