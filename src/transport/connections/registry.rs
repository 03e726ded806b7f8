//! The bookkeeping of one listener's connections: which are open, in what
//! stage (silent, unused, used), how many requests each runs, when each
//! expires, and whom to close for a new one at the cap. Knows no stream
//! and no request: `tracked` and `activity` report to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ListenerLimits;

/// How often the same kind of warning is logged for one listener.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The limits this module applies to one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Open connections from one address that is not a trusted proxy.
    pub max_per_address: usize,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `limits` with the cap `max_connections`.
    pub fn new(limits: &ListenerLimits, max_connections: usize) -> Self {
        Self {
            max_connections,
            max_per_address: limits.max_connections_per_address,
            first_request_timeout: limits.first_request_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }
}

/// Why a connection was closed.
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
    /// What the connection's next read fails with.
    pub(super) fn into_error(self) -> io::Error {
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

/// The open connections of one listener.
#[derive(Debug)]
pub(super) struct Registry {
    /// Names the listener in log lines.
    pub(super) listener: &'static str,
    pub(super) limits: ConnectionLimits,
    /// Peers the cap per address does not apply to.
    trusted: Vec<IpAddr>,
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
    /// The same, by address (those not from a trusted proxy).
    by_address: HashMap<IpAddr, usize>,
    warned_at: Option<Instant>,
    unwarned: u64,
}

/// One open connection.
#[derive(Debug)]
pub(super) struct Connection {
    id: u64,
    /// Its peer's address, when the cap per address counts it.
    address: Option<IpAddr>,
    pub(super) accepted_at: Instant,
    state: Mutex<State>,
    /// Set with `state.closed`, readable without the lock: the reader's
    /// fast path checks it on every read.
    pub(super) closing: AtomicBool,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) stage: Stage,
    pub(super) in_flight: usize,
    pub(super) idle_since: Instant,
    pub(super) closed: Option<Closed>,
    /// The task reading the connection, woken to close it.
    pub(super) reader: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Silent,
    Unused,
    Used,
}

impl Connection {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a connection's timer waits for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expiry {
    /// A request is in progress: nothing.
    Busy,
    /// Closed for this reason at this time, unless a request comes first.
    At(Instant, Closed),
}

impl State {
    pub(super) fn expiry(&self, accepted_at: Instant, limits: &ConnectionLimits) -> Expiry {
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

impl Registry {
    pub(super) fn new(
        listener: &'static str,
        limits: ConnectionLimits,
        trusted: &[IpAddr],
    ) -> Self {
        Self {
            listener,
            limits,
            trusted: trusted.to_vec(),
            open: Mutex::new(Open::default()),
        }
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open and not being closed.
    pub(super) fn live(&self) -> usize {
        self.open().live
    }

    /// Requests running on the listener's connections now.
    pub(super) fn requests_in_flight(&self) -> usize {
        let open = self.open();
        open.all.values().map(|c| c.state().in_flight).sum()
    }

    /// Registers a connection from `peer` accepted `now`, making room for
    /// it at the cap per address (among that address's connections), then
    /// at the listener's cap; `None` when there is none (every connection
    /// that could make room is busy).
    pub(super) fn admit(&self, now: Instant, peer: Option<IpAddr>) -> Option<Arc<Connection>> {
        let mut wake = None;
        let mut open = self.open();
        // An IPv4 client on a dual-stack socket counts as its IPv4 address.
        let address = peer
            .map(|ip| ip.to_canonical())
            .filter(|ip| !self.trusted.contains(ip));
        if let Some(ip) = address
            && open.by_address.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_address
        {
            let victim = open.victim(|c| c.address == Some(ip));
            if let Some(victim) = &victim {
                wake = open.close(victim, Closed::Evicted);
            }
            if let Some(unwarned) = open.warn(now) {
                let what = match victim {
                    Some(_) => {
                        "connection cap per address reached: closed that address's oldest connection not in use to admit a new one"
                    }
                    None => {
                        "connection cap per address reached and every connection of that address is busy: refused a new connection"
                    }
                };
                tracing::warn!(
                    listener = self.listener,
                    address = %ip,
                    max_connections_per_address = self.limits.max_per_address,
                    similar_unlogged = unwarned,
                    "{what}"
                );
            }
            victim.as_ref()?;
        }
        if open.live >= self.limits.max_connections {
            // Not after an eviction above: that one made room.
            let victim = open.victim(|_| true);
            if let Some(victim) = &victim {
                wake = open.close(victim, Closed::Evicted);
            }
            if let Some(unwarned) = open.warn(now) {
                let what = match victim {
                    Some(_) => {
                        "connection cap reached: closed the oldest connection not in use to admit a new one"
                    }
                    None => {
                        "connection cap reached and every connection is busy: refused a new connection"
                    }
                };
                tracing::warn!(
                    listener = self.listener,
                    max_connections = self.limits.max_connections,
                    similar_unlogged = unwarned,
                    "{what}"
                );
            }
            // Every connection is busy: refused.
            victim.as_ref()?;
        }
        let id = open.next_id;
        open.next_id += 1;
        let connection = Arc::new(Connection {
            id,
            address,
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
        if let Some(ip) = address {
            *open.by_address.entry(ip).or_default() += 1;
        }
        drop(open);
        if let Some(waker) = wake {
            waker.wake();
        }
        Some(connection)
    }

    /// Closes every connection that has sent no request yet.
    pub(super) fn close_unused(&self) {
        let mut open = self.open();
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

    /// Closes one connection not in use; whether there was one.
    pub(super) fn make_room(&self) -> bool {
        let mut open = self.open();
        let wake = match open.victim(|_| true) {
            Some(victim) => open.close(&victim, Closed::Evicted),
            None => return false,
        };
        drop(open);
        if let Some(waker) = wake {
            waker.wake();
        }
        true
    }

    /// Whether to log a warning about this listener at `now`; if so, how
    /// many were left out since the last.
    pub(super) fn warn(&self, now: Instant) -> Option<u64> {
        self.open().warn(now)
    }

    /// `connection` received its first bytes.
    pub(super) fn spoke(&self, connection: &Connection) {
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
    pub(super) fn used(&self, connection: &Connection) {
        let mut open = self.open();
        let mut state = connection.state();
        if state.stage != Stage::Used {
            state.stage = Stage::Used;
            open.silent.remove(&connection.id);
            open.unused.remove(&connection.id);
        }
    }

    pub(super) fn close(&self, connection: &Connection, why: Closed) {
        let wake = self.open().close(connection, why);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// `connection`'s stream was dropped: its socket is closed.
    pub(super) fn remove(&self, connection: &Connection) {
        let mut open = self.open();
        let closed = connection.state().closed.is_some();
        open.all.remove(&connection.id);
        open.silent.remove(&connection.id);
        open.unused.remove(&connection.id);
        if !closed {
            open.uncount(connection);
        }
    }
}

impl Open {
    /// The connection to close for a new one, among those `among` picks:
    /// the oldest silent, else the oldest unused, else the one idle
    /// longest; never a busy one.
    fn victim(&self, among: impl Fn(&Connection) -> bool) -> Option<Arc<Connection>> {
        let quiet = self.silent.iter().chain(&self.unused);
        if let Some(c) = quiet.filter_map(|id| self.all.get(id)).find(|c| among(c)) {
            return Some(c.clone());
        }
        self.all
            .values()
            .filter(|c| among(c))
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
        self.uncount(connection);
        self.silent.remove(&connection.id);
        self.unused.remove(&connection.id);
        state.reader.take()
    }

    /// `connection` no longer counts against the caps.
    fn uncount(&mut self, connection: &Connection) {
        self.live -= 1;
        if let Some(ip) = connection.address
            && let Some(count) = self.by_address.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                self.by_address.remove(&ip);
            }
        }
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
