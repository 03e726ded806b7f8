//! The connection limits tonic lacks: a cap on a listener's open
//! connections, a deadline for a connection's first request, an idle
//! timeout, and each connection's share of the listener's concurrency.
//! tonic limits the streams on a connection and sends keepalive pings (see
//! `startup`); this module limits how many connections there are, how long
//! one may sit doing nothing, so that clients which connect and then stay
//! silent cannot use up the process's file descriptors, and how many
//! requests one may run at once, so that one connection cannot take the
//! whole listener. The share is counted here, where each connection's
//! requests are counted anyway, rather than by a semaphore per connection.
//!
//! It sits in the accept path. [`Connections::incoming`] wraps the listener;
//! every accepted socket becomes a [`Tracked`] stream registered with the
//! listener's [`Connections`], and [`ActivityLayer`] (a tower layer on the
//! listener's services) tells the registry when each of the connection's
//! requests starts and ends. A connection is closed, by failing its next
//! read so that hyper drops it:
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

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::config::ListenerLimits;

/// How long accepting pauses when the process is out of file descriptors
/// (accepting again at once would spin: the listener stays readable).
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);

/// How often the same kind of warning is logged for one listener.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Descriptors kept for everything but client connections (the store's
/// connections and files, the listeners, the runtime) when the connection
/// cap is fitted to the descriptor limit.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The limits this module applies to one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `limits` with the cap `max_connections`.
    pub fn new(limits: &ListenerLimits, max_connections: usize) -> Self {
        Self {
            max_connections,
            first_request_timeout: limits.first_request_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }
}

/// Why this module closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It sent no request within the first-request timeout.
    NoFirstRequest,
    /// No request of its own was in progress for the idle timeout.
    Idle,
    /// The listener was at its cap and a newer connection took its place.
    Evicted,
    /// The server is stopping and the connection had sent no request.
    Stopping,
}

impl Closed {
    fn into_error(self) -> io::Error {
        let (kind, message) = match self {
            Closed::NoFirstRequest => (
                io::ErrorKind::TimedOut,
                "closed: no request within the first-request timeout",
            ),
            Closed::Idle => (io::ErrorKind::TimedOut, "closed: idle"),
            Closed::Evicted => (
                io::ErrorKind::ConnectionAborted,
                "closed: the listener's connection cap was reached",
            ),
            Closed::Stopping => (io::ErrorKind::ConnectionAborted, "closed: server stopping"),
        };
        io::Error::new(kind, message)
    }
}

/// Raises the soft limit on open file descriptors to the hard limit, and
/// returns the limit now in force (`None` where it cannot be read).
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
/// listeners, keeping [`RESERVED_DESCRIPTORS`] for everything else: the
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

/// The open connections of one listener.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Registry>);

#[derive(Debug)]
struct Registry {
    listener: &'static str,
    limits: ConnectionLimits,
    open: Mutex<Open>,
}

/// Ids increase with accept order, so the first of a set is its oldest.
#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    all: BTreeMap<u64, Arc<Connection>>,
    /// Accepted, not a byte received yet.
    silent: BTreeSet<u64>,
    /// Has sent bytes, but no request yet.
    unused: BTreeSet<u64>,
    /// Connections in `all` not marked closed: what the cap counts.
    live: usize,
    warned_at: Option<Instant>,
    unwarned: u64,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    accepted_at: Instant,
    state: Mutex<State>,
    /// Set with `state.closed`, readable without the lock: the reader's
    /// fast path checks it on every read.
    closing: AtomicBool,
}

#[derive(Debug)]
struct State {
    stage: Stage,
    in_flight: usize,
    idle_since: Instant,
    closed: Option<Closed>,
    /// The task reading the connection, woken to close it.
    reader: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Silent,
    Unused,
    Used,
}

impl Connection {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a connection's timer waits for.
#[derive(Debug, PartialEq, Eq)]
enum Expiry {
    /// A request is in progress: nothing.
    Busy,
    /// Closed for this reason at this time, unless a request comes first.
    At(Instant, Closed),
}

impl State {
    fn expiry(&self, accepted_at: Instant, limits: &ConnectionLimits) -> Expiry {
        match self.stage {
            _ if self.in_flight > 0 => Expiry::Busy,
            Stage::Silent | Stage::Unused => Expiry::At(
                accepted_at + limits.first_request_timeout,
                Closed::NoFirstRequest,
            ),
            Stage::Used => Expiry::At(self.idle_since + limits.idle_timeout, Closed::Idle),
        }
    }
}

impl Connections {
    /// `listener` names it in log lines.
    pub fn new(listener: &'static str, limits: ConnectionLimits) -> Self {
        Self(Arc::new(Registry {
            listener,
            limits,
            open: Mutex::new(Open::default()),
        }))
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
        self.0.open().live
    }

    /// Requests running on this listener's connections now (for the log
    /// of a shutdown that abandons them).
    pub fn requests_in_flight(&self) -> usize {
        let open = self.0.open();
        open.all.values().map(|c| c.state().in_flight).sum()
    }

    /// Registers a newly accepted connection, making room for it at the
    /// cap; gives it back when there is none (every connection is busy).
    pub fn admit<IO>(&self, io: IO) -> Result<Tracked<IO>, IO> {
        let now = Instant::now();
        let mut wake = None;
        let mut open = self.0.open();
        if open.live >= self.0.limits.max_connections {
            match open.victim() {
                Some(victim) => {
                    wake = open.close(&victim, Closed::Evicted);
                    if let Some(unwarned) = open.warn(now) {
                        tracing::warn!(
                            listener = self.0.listener,
                            max_connections = self.0.limits.max_connections,
                            similar_unlogged = unwarned,
                            "connection cap reached: closed the oldest connection not in use to admit a new one"
                        );
                    }
                }
                None => {
                    if let Some(unwarned) = open.warn(now) {
                        tracing::warn!(
                            listener = self.0.listener,
                            max_connections = self.0.limits.max_connections,
                            similar_unlogged = unwarned,
                            "connection cap reached and every connection is busy: refused a new connection"
                        );
                    }
                    return Err(io);
                }
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let connection = Arc::new(Connection {
            id,
            accepted_at: now,
            state: Mutex::new(State {
                stage: Stage::Silent,
                in_flight: 0,
                idle_since: now,
                closed: None,
                reader: None,
            }),
            closing: AtomicBool::new(false),
        });
        open.all.insert(id, connection.clone());
        open.silent.insert(id);
        open.live += 1;
        drop(open);
        if let Some(waker) = wake {
            waker.wake();
        }
        let timer = Box::pin(tokio::time::sleep_until(
            now + self.0.limits.first_request_timeout,
        ));
        Ok(Tracked {
            io,
            connection,
            registry: self.0.clone(),
            timer,
            armed_for: None,
            spoke: false,
        })
    }

    /// Closes every connection that has sent no request yet: they would
    /// otherwise hold a stopping server's drain until their timeout.
    pub fn close_unused(&self) {
        let mut open = self.0.open();
        let unused: Vec<Arc<Connection>> = open
            .silent
            .iter()
            .chain(&open.unused)
            .filter_map(|id| open.all.get(id).cloned())
            .collect();
        let wakers: Vec<Waker> = unused
            .iter()
            .filter_map(|c| open.close(c, Closed::Stopping))
            .collect();
        drop(open);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Closes one connection not in use, when out of file descriptors.
    fn make_room(&self) -> bool {
        let mut open = self.0.open();
        let wake = match open.victim() {
            Some(victim) => open.close(&victim, Closed::Evicted),
            None => return false,
        };
        drop(open);
        if let Some(waker) = wake {
            waker.wake();
        }
        true
    }
}

impl Registry {
    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `connection` received its first bytes.
    fn spoke(&self, connection: &Connection) {
        let mut open = self.open();
        let mut state = connection.state();
        if state.stage == Stage::Silent {
            state.stage = Stage::Unused;
            if open.silent.remove(&connection.id) && state.closed.is_none() {
                open.unused.insert(connection.id);
            }
        }
    }

    /// `connection` started its first request.
    fn used(&self, connection: &Connection) {
        let mut open = self.open();
        let mut state = connection.state();
        if state.stage != Stage::Used {
            state.stage = Stage::Used;
            open.silent.remove(&connection.id);
            open.unused.remove(&connection.id);
        }
    }

    fn close(&self, connection: &Connection, why: Closed) {
        let wake = self.open().close(connection, why);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// `connection`'s stream was dropped: its socket is closed.
    fn remove(&self, connection: &Connection) {
        let mut open = self.open();
        let closed = connection.state().closed.is_some();
        open.all.remove(&connection.id);
        open.silent.remove(&connection.id);
        open.unused.remove(&connection.id);
        if !closed {
            open.live -= 1;
        }
    }
}

impl Open {
    /// The connection to close for a new one: the oldest silent, else the
    /// oldest unused, else the one idle longest; never a busy one.
    fn victim(&self) -> Option<Arc<Connection>> {
        if let Some(id) = self.silent.first().or_else(|| self.unused.first()) {
            return self.all.get(id).cloned();
        }
        self.all
            .values()
            .filter_map(|c| {
                let state = c.state();
                (state.closed.is_none() && state.in_flight == 0).then_some((state.idle_since, c))
            })
            .min_by_key(|(idle_since, _)| *idle_since)
            .map(|(_, c)| c.clone())
    }

    /// Marks `connection` closed; returns its reader to wake (after the
    /// registry's lock is released).
    fn close(&mut self, connection: &Connection, why: Closed) -> Option<Waker> {
        let mut state = connection.state();
        if state.closed.is_some() {
            return None;
        }
        state.closed = Some(why);
        connection.closing.store(true, Ordering::Release);
        self.live -= 1;
        self.silent.remove(&connection.id);
        self.unused.remove(&connection.id);
        state.reader.take()
    }

    /// Whether to log a warning now; if so, how many were left out.
    fn warn(&mut self, now: Instant) -> Option<u64> {
        match self.warned_at {
            Some(at) if now.duration_since(at) < WARN_EVERY => {
                self.unwarned += 1;
                None
            }
            _ => {
                self.warned_at = Some(now);
                Some(std::mem::take(&mut self.unwarned))
            }
        }
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
                Some(Ok(stream)) => match this.connections.admit(stream) {
                    Ok(tracked) => return Poll::Ready(Some(Ok(tracked))),
                    // Dropping it closes the socket: the client sees the
                    // connection closed rather than a silent hang.
                    Err(refused) => drop(refused),
                },
                Some(Err(e)) if out_of_descriptors(&e) => {
                    let made_room = this.connections.make_room();
                    let now = Instant::now();
                    if let Some(unwarned) = this.connections.0.open().warn(now) {
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

/// An accepted connection, closed (its reads fail) when this module
/// decides so; it leaves its listener's registry when dropped.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    connection: Arc<Connection>,
    registry: Arc<Registry>,
    /// Fires at the connection's expiry, or earlier; then it is checked.
    timer: Pin<Box<Sleep>>,
    /// The waker the timer and the registry were last given: while it is
    /// the reader's, the timer has not fired and nobody closed the
    /// connection, a read needs no check (the fast path of every read).
    armed_for: Option<Waker>,
    spoke: bool,
}

impl<IO> Tracked<IO> {
    /// An error when the connection is to be closed now; otherwise the
    /// timer is armed to wake the reader at its expiry.
    fn poll_expiry(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            let expiry = {
                let mut state = self.connection.state();
                if let Some(why) = state.closed {
                    return Err(why.into_error());
                }
                if !state
                    .reader
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    state.reader = Some(cx.waker().clone());
                }
                state.expiry(self.connection.accepted_at, &self.registry.limits)
            };
            let now = Instant::now();
            match expiry {
                Expiry::At(at, why) if at <= now => {
                    self.registry.close(&self.connection, why);
                    return Err(why.into_error());
                }
                // The timer fires no later than one idle timeout from now:
                // a request that starts and ends meanwhile can only move
                // the expiry later than that, so reads between need no
                // check. It only moves when it would fire too late or has
                // fired: a connection in use resets it once per timeout,
                // not once per request.
                Expiry::At(at, _) => {
                    let at = at.min(now + self.registry.limits.idle_timeout);
                    if self.timer.deadline() > at || self.timer.is_elapsed() {
                        self.timer.as_mut().reset(at);
                    }
                }
                Expiry::Busy => {
                    if self.timer.is_elapsed() {
                        let at = now + self.registry.limits.idle_timeout;
                        self.timer.as_mut().reset(at);
                    }
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                if !self
                    .armed_for
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    self.armed_for = Some(cx.waker().clone());
                }
                return Ok(());
            }
        }
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        self.registry.remove(&self.connection);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let armed = this
            .armed_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !armed || this.timer.is_elapsed() || this.connection.closing.load(Ordering::Acquire) {
            this.poll_expiry(cx)?;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if !this.spoke && matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.spoke = true;
            this.registry.spoke(&this.connection);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What tonic puts in each request's extensions for a tracked connection:
/// [`ActivityLayer`] marks the request on its connection through it, and
/// [`peer_addr`] reads the peer's address from it (tonic's own
/// `Request::remote_addr` only knows its own connection types).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    activity: Activity,
}

/// The address of the peer that sent `request`.
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    match request.extensions().get::<ConnectionInfo>() {
        Some(info) => info.tcp.remote_addr(),
        None => request.remote_addr(),
    }
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
struct Activity {
    connection: Arc<Connection>,
    registry: Arc<Registry>,
}

impl Activity {
    /// Marks a request started, unless `limit` requests already run on
    /// this connection (then `None`: shed it).
    fn request(&self, limit: usize) -> Option<RequestGuard> {
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
struct RequestGuard(Arc<Connection>);

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
/// whole limit. It must be the outermost of the listener's layers, so that
/// a request shed by a limit below still counts as the connection being
/// used.
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const FIRST: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    fn connections(max_connections: usize) -> Connections {
        Connections::new(
            "test",
            ConnectionLimits {
                max_connections,
                first_request_timeout: FIRST,
                idle_timeout: IDLE,
            },
        )
    }

    /// A tracked connection and the client's end of it.
    fn connect(connections: &Connections) -> (Tracked<DuplexStream>, DuplexStream) {
        let (server, client) = duplex(1024);
        let tracked = connections.admit(server).expect("admitted");
        (tracked, client)
    }

    fn activity(tracked: &Tracked<DuplexStream>) -> Activity {
        Activity {
            connection: tracked.connection.clone(),
            registry: tracked.registry.clone(),
        }
    }

    /// Reads until the connection is closed; the error's kind and when.
    async fn closed(tracked: &mut Tracked<DuplexStream>) -> (io::ErrorKind, Duration) {
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
    fn is_closed(tracked: &mut Tracked<DuplexStream>) -> bool {
        let mut buf = [0; 64];
        let mut read_buf = ReadBuf::new(&mut buf);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        matches!(
            Pin::new(tracked).poll_read(&mut cx, &mut read_buf),
            Poll::Ready(Err(_))
        )
    }

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
                first_request_timeout: Duration::from_secs(60),
                idle_timeout: short_idle,
            },
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
        assert!(connections.admit(server).is_err());
        // A connection that goes frees its place.
        drop(first);
        let (server, _client) = duplex(64);
        assert!(connections.admit(server).is_ok());
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

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(fitted_cap(10_000, 2, Some(1_048_576)), 10_000);
        assert_eq!(fitted_cap(10_000, 2, Some(4_096)), (4_096 - 256) / 2);
        assert_eq!(fitted_cap(10_000, 1, Some(100)), 1);
        assert_eq!(fitted_cap(10_000, 2, None), 10_000);
    }
}
