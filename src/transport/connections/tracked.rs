//! An accepted connection as the registry tracks it: its reads fail once
//! the registry or its own timer closes it, and it tells the registry when
//! it first speaks and when it is gone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::registry::{Connection, Expiry, Registry};

/// An accepted connection, closed (its reads fail) when this module
/// decides so; it leaves its listener's registry when dropped.
#[derive(Debug)]
pub struct Tracked<IO> {
    pub(super) io: IO,
    pub(super) connection: Arc<Connection>,
    pub(super) registry: Arc<Registry>,
    /// Fires at the connection's expiry, or earlier; then it is checked.
    timer: Pin<Box<Sleep>>,
    /// The waker the timer and the registry were last given: while it is
    /// the reader's, the timer has not fired and nobody closed the
    /// connection, a read needs no check (the fast path of every read).
    armed_for: Option<Waker>,
    spoke: bool,
}

impl<IO> Tracked<IO> {
    pub(super) fn new(
        io: IO,
        connection: Arc<Connection>,
        registry: Arc<Registry>,
        timer: Pin<Box<Sleep>>,
    ) -> Self {
        Self {
            io,
            connection,
            registry,
            timer,
            armed_for: None,
            spoke: false,
        }
    }

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
