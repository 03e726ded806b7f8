//! The connection limits tonic lacks: a cap on a listener's open
//! connections, a deadline for a connection's first request, an idle
//! timeout, and each connection's share of the listener's concurrency.
//! tonic limits the streams on a connection and sends keepalive pings (see
//! `runtime::listener`); this module limits how many connections there are,
//! how long one may sit doing nothing, so that clients which connect and then stay
//! silent cannot use up the process's file descriptors, and how many
//! requests one may run at once, so that one connection cannot take the
//! whole listener. The share is counted here, where each connection's
//! requests are counted anyway, rather than by a semaphore per connection.
//!
//! It sits in the accept path. [`Connections::incoming`] (here) wraps the
//! listener; every accepted socket becomes a [`Tracked`] stream (`tracked`)
//! registered with the listener's registry (`registry`: the bookkeeping),
//! and [`ActivityLayer`] (`activity`: a tower layer on the listener's
//! services) tells the registry when each of the connection's requests
//! starts and ends. `descriptors` fits the connection cap to the process's
//! file-descriptor limit. A connection is closed, by failing its next read
//! so that hyper drops it:
//!
//! - when it has sent no request within `first_request_timeout` of being
//!   accepted (whether it sent nothing at all or only part of a request);
//! - when no request of its own has been in progress for `idle_timeout`;
//! - when the listener is at `max_connections` and a newer connection needs
//!   its place: first the oldest connection that has not sent a byte, then
//!   the oldest that has sent no request, then the one idle longest. A
//!   connection with a request in progress is never evicted; when all are
//!   busy, the new connection is refused (closed at once) instead.
//!
//! Closing is abrupt (no HTTP/2 GOAWAY; tonic keeps the connection's
//! handle), so it is done only while the connection has no request in
//! progress. A gRPC client whose idle connection was closed opens a new one
//! for its next call.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::TcpIncoming;

mod activity;
mod descriptors;
mod registry;
mod tracked;

pub use activity::{Active, ActiveFuture, ActivityLayer, ConnectionInfo, peer_addr, peer_addr_in};
pub use descriptors::{fit_connection_cap, fitted_cap, raise_descriptor_limit};
pub use registry::{Closed, ConnectionLimits};
pub use tracked::Tracked;

use registry::Registry;

/// How long accepting pauses when the process is out of file descriptors
/// (accepting again at once would spin: the listener stays readable).
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);

/// The open connections of one listener.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Registry>);

impl Connections {
    /// `listener` names it in log lines.
    /// `trusted_proxies` are peers the cap per address does not apply to.
    pub fn new(
        listener: &'static str,
        limits: ConnectionLimits,
        trusted_proxies: &[std::net::IpAddr],
    ) -> Self {
        Self(Arc::new(Registry::new(listener, limits, trusted_proxies)))
    }

    /// The accepted connections of `incoming`, each tracked.
    pub fn incoming(&self, incoming: TcpIncoming) -> Incoming {
        Incoming {
            tcp: incoming,
            connections: self.clone(),
            pause: None,
        }
    }

    /// Connections open and not being closed.
    pub fn live(&self) -> usize {
        self.0.live()
    }

    /// Requests running on this listener's connections now (for the log
    /// of a shutdown that abandons them).
    pub fn requests_in_flight(&self) -> usize {
        self.0.requests_in_flight()
    }

    /// Registers a newly accepted connection from `peer`, making room for
    /// it at the caps; gives it back when there is none (every connection
    /// that could make room is busy).
    pub fn admit<IO>(&self, io: IO, peer: Option<std::net::IpAddr>) -> Result<Tracked<IO>, IO> {
        let now = Instant::now();
        let Some(connection) = self.0.admit(now, peer) else {
            return Err(io);
        };
        let timer = Box::pin(tokio::time::sleep_until(
            now + self.0.limits.first_request_timeout,
        ));
        Ok(Tracked::new(io, connection, self.0.clone(), timer))
    }

    /// Closes every connection that has sent no request yet: they would
    /// otherwise hold a stopping server's drain until their timeout.
    pub fn close_unused(&self) {
        self.0.close_unused();
    }
}

/// A listener's accepted connections, tracked; see [`Connections::incoming`].
#[derive(Debug)]
pub struct Incoming {
    tcp: TcpIncoming,
    connections: Connections,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<Tracked<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match std::task::ready!(Pin::new(&mut this.tcp).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(stream)) => {
                    let peer = stream.peer_addr().ok().map(|a| a.ip());
                    match this.connections.admit(stream, peer) {
                        Ok(tracked) => return Poll::Ready(Some(Ok(tracked))),
                        // Dropping it closes the socket: the client sees
                        // the connection closed rather than a silent hang.
                        Err(refused) => drop(refused),
                    }
                }
                Some(Err(e)) if out_of_descriptors(&e) => {
                    let made_room = this.connections.0.make_room();
                    let now = Instant::now();
                    if let Some(unwarned) = this.connections.0.warn(now) {
                        tracing::warn!(
                            listener = this.connections.0.listener,
                            error = %e,
                            closed_one_not_in_use = made_room,
                            similar_unlogged = unwarned,
                            "cannot accept a connection: out of file descriptors"
                        );
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (the process's limit) and ENFILE (the system's).
    matches!(e.raw_os_error(), Some(24 | 23))
}

/// What the unit tests of this module and its parts share: a registry with
/// short limits, its connections, and ways to see them closed.
#[cfg(test)]
mod testing {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use tokio::io::{AsyncRead, AsyncReadExt, DuplexStream, ReadBuf, duplex};

    use std::net::IpAddr;

    use super::activity::Activity;
    use super::*;

    pub(super) const FIRST: Duration = Duration::from_secs(10);
    pub(super) const IDLE: Duration = Duration::from_secs(60);

    pub(super) fn connections(max_connections: usize) -> Connections {
        Connections::new(
            "test",
            ConnectionLimits {
                max_connections,
                max_per_address: max_connections,
                first_request_timeout: FIRST,
                idle_timeout: IDLE,
            },
            &[],
        )
    }

    /// A tracked connection and the client's end of it.
    pub(super) fn connect(connections: &Connections) -> (Tracked<DuplexStream>, DuplexStream) {
        let (server, client) = duplex(1024);
        let tracked = connections.admit(server, None).expect("admitted");
        (tracked, client)
    }

    /// Connections capped at `per_address` from one address, but for
    /// `trusted`.
    pub(super) fn connections_per_address(per_address: usize, trusted: IpAddr) -> Connections {
        Connections::new(
            "test",
            ConnectionLimits {
                max_connections: 100,
                max_per_address: per_address,
                first_request_timeout: FIRST,
                idle_timeout: IDLE,
            },
            &[trusted],
        )
    }

    /// A connection from `peer`, when admitted, and the client's end.
    pub(super) fn connect_from(
        connections: &Connections,
        peer: IpAddr,
    ) -> Option<(Tracked<DuplexStream>, DuplexStream)> {
        let (server, client) = duplex(1024);
        Some((connections.admit(server, Some(peer)).ok()?, client))
    }

    pub(super) fn activity(tracked: &Tracked<DuplexStream>) -> Activity {
        Activity {
            connection: tracked.connection.clone(),
            registry: tracked.registry.clone(),
        }
    }

    /// Reads until the connection is closed; the error's kind and when.
    pub(super) async fn closed(tracked: &mut Tracked<DuplexStream>) -> (io::ErrorKind, Duration) {
        let started = Instant::now();
        let mut buf = [0; 64];
        loop {
            match tracked.read(&mut buf).await {
                Ok(0) => panic!("the client hung up"),
                Ok(_) => {}
                Err(e) => return (e.kind(), started.elapsed()),
            }
        }
    }

    /// Whether a read fails at once, i.e. the connection is closed.
    pub(super) fn is_closed(tracked: &mut Tracked<DuplexStream>) -> bool {
        let mut buf = [0; 64];
        let mut read_buf = ReadBuf::new(&mut buf);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        matches!(
            Pin::new(tracked).poll_read(&mut cx, &mut read_buf),
            Poll::Ready(Err(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use std::net::IpAddr;

    use super::testing::{
        FIRST, IDLE, activity, closed, connect, connect_from, connections, connections_per_address,
        is_closed,
    };
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_request_is_closed_after_the_first_request_timeout() {
        let connections = connections(10);
        let (mut silent, _client) = connect(&connections);
        let (mut talking, mut client) = connect(&connections);
        // Bytes alone (say, the HTTP/2 preface) are not a request.
        client.write_all(b"PRI * HTTP/2.0").await.unwrap();
        assert_eq!(closed(&mut silent).await, (io::ErrorKind::TimedOut, FIRST));
        assert_eq!(closed(&mut talking).await.0, io::ErrorKind::TimedOut);
        assert_eq!(connections.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_once_idle_and_never_while_a_request_runs() {
        let connections = connections(10);
        let (mut tracked, _client) = connect(&connections);
        let request = activity(&tracked).request(usize::MAX);
        // Long past both timeouts, the request still holds it open.
        let read = tokio::time::timeout(FIRST + IDLE * 3, closed(&mut tracked)).await;
        assert!(read.is_err(), "closed while a request was running");
        drop(request);
        assert_eq!(closed(&mut tracked).await, (io::ErrorKind::TimedOut, IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn every_request_restarts_the_idle_timeout() {
        let connections = connections(10);
        let (mut tracked, _client) = connect(&connections);
        for _ in 0..5 {
            drop(activity(&tracked).request(usize::MAX));
            let read = tokio::time::timeout(IDLE / 2, closed(&mut tracked)).await;
            assert!(read.is_err(), "closed before it was idle for the timeout");
        }
        drop(activity(&tracked).request(usize::MAX));
        assert_eq!(closed(&mut tracked).await.1, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_first_request_timeout_holds_between_reads() {
        let short_idle = Duration::from_secs(5);
        let connections = Connections::new(
            "test",
            ConnectionLimits {
                max_connections: 10,
                max_per_address: 10,
                first_request_timeout: Duration::from_secs(60),
                idle_timeout: short_idle,
            },
            &[],
        );
        let (mut tracked, mut client) = connect(&connections);
        // A read arms the timer while no request ran yet...
        client.write_all(b"PRI").await.unwrap();
        let mut buf = [0; 8];
        assert_eq!(tracked.read(&mut buf).await.unwrap(), 3);
        // ...then a request comes and goes without a read in between: the
        // reads' fast path must still close it one idle timeout later.
        drop(activity(&tracked).request(usize::MAX));
        assert_eq!(
            closed(&mut tracked).await,
            (io::ErrorKind::TimedOut, short_idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_oldest_silent_connection_makes_room() {
        let connections = connections(3);
        let (mut used, _c1) = connect(&connections);
        let _request = activity(&used).request(usize::MAX);
        let (mut spoke, mut c2) = connect(&connections);
        c2.write_all(b"PRI").await.unwrap();
        let mut buf = [0; 3];
        spoke.read_exact(&mut buf).await.unwrap();
        let (mut silent, _c3) = connect(&connections);

        let (mut newest, mut c4) = connect(&connections);
        assert!(is_closed(&mut silent), "the silent connection goes first");
        assert!(!is_closed(&mut spoke) && !is_closed(&mut used) && !is_closed(&mut newest));
        assert_eq!(connections.live(), 3);

        // With none silent, the oldest that sent no request: `spoke`
        // before `newest`; the busy one never.
        c4.write_all(b"PRI").await.unwrap();
        newest.read_exact(&mut buf).await.unwrap();
        let (_newer, _c5) = connect(&connections);
        assert!(is_closed(&mut spoke));
        assert!(!is_closed(&mut newest) && !is_closed(&mut used));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_with_every_connection_used_the_longest_idle_makes_room() {
        let connections = connections(2);
        let (mut first, _c1) = connect(&connections);
        let (mut second, _c2) = connect(&connections);
        drop(activity(&first).request(usize::MAX));
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(activity(&second).request(usize::MAX));
        let (_third, _c3) = connect(&connections);
        assert!(is_closed(&mut first), "idle longest");
        assert!(!is_closed(&mut second));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_with_every_connection_busy_a_new_one_is_refused() {
        let connections = connections(2);
        let (first, _c1) = connect(&connections);
        let (second, _c2) = connect(&connections);
        let _busy = (
            activity(&first).request(usize::MAX),
            activity(&second).request(usize::MAX),
        );
        let (server, _client) = duplex(64);
        assert!(connections.admit(server, None).is_err());
        // A connection that goes frees its place.
        drop(first);
        let (server, _client) = duplex(64);
        assert!(connections.admit(server, None).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_per_address_only_that_address_makes_room_or_is_refused() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let proxy: IpAddr = "192.0.2.9".parse().unwrap();
        let connections = connections_per_address(2, proxy);
        let (mut other, _c0) = connect_from(&connections, b).unwrap();
        let (busy, _c1) = connect_from(&connections, a).unwrap();
        let _request = activity(&busy).request(usize::MAX);
        let (mut silent, _c2) = connect_from(&connections, a).unwrap();
        // A third from `a` closes `a`'s silent one, not `b`'s.
        let (newest, _c3) = connect_from(&connections, a).expect("room made");
        assert!(is_closed(&mut silent));
        assert!(!is_closed(&mut other));
        // With both of `a`'s busy, the next from `a` is refused; `b` and
        // the trusted proxy still get in, the proxy beyond the cap.
        let _also = activity(&newest).request(usize::MAX);
        assert!(connect_from(&connections, a).is_none());
        let _more_b = connect_from(&connections, b).expect("b under its cap");
        let proxied: Vec<_> = (0..5)
            .map(|_| connect_from(&connections, proxy).expect("a trusted proxy is not capped"))
            .collect();
        assert_eq!(connections.live(), 2 + 2 + proxied.len());
        // A connection that goes frees its address's place.
        drop(busy);
        assert!(connect_from(&connections, a).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_closes_the_connections_that_sent_no_request() {
        let connections = connections(10);
        let (mut silent, _c1) = connect(&connections);
        let (mut used, _c2) = connect(&connections);
        drop(activity(&used).request(usize::MAX));
        connections.close_unused();
        assert!(is_closed(&mut silent));
        assert!(!is_closed(&mut used));
        assert_eq!(connections.live(), 1);
    }
}
