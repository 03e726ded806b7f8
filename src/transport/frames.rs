//! HTTP/2 frames watched below hyper, on every connection of every
//! listener (after TLS): what h2 does not limit, and closing one connection
//! with an HTTP/2 GOAWAY, which tonic offers only for the whole server.
//!
//! h2 answers every SETTINGS and PING and takes every WINDOW_UPDATE,
//! PRIORITY and empty DATA frame without limit, each costing the server
//! work (an acknowledgement to write, a window or tree to update) while no
//! request is made. A connection that sends more of them than its
//! `http2_max_control_frames_per_second` (counted in one-second windows;
//! each DATA or HEADERS frame the server sends allows two more, so a
//! client updating its windows for what it receives is never cut) gets a
//! GOAWAY with ENHANCE_YOUR_CALM, as Go's and nginx's servers send, and is
//! closed.
//!
//! A connection can also be asked to go ([`Drain::close_after_calls`]): it
//! gets a GOAWAY (NO_ERROR) that lets the client open no new call, the
//! calls it had opened finish, and then it is closed.
//!
//! Both directions are read as frames (9-byte headers; the payloads are
//! skipped, never copied), so that a GOAWAY is written between two of h2's
//! frames, never inside one, and the calls in progress are known: a call
//! opens with the client's HEADERS and ends with the server's END_STREAM or
//! either side's RST_STREAM.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// What an HTTP/2 client sends before its first frame; a connection that
/// starts otherwise speaks HTTP/1.1.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;

const NO_ERROR: u32 = 0x0;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The highest stream id: a GOAWAY naming it refuses no stream already
/// opened (the first of a graceful close's two, as h2's own).
const ALL_STREAMS: u32 = (1 << 31) - 1;

/// How long a closing connection has to take its GOAWAY and hang up after
/// it, before it is dropped all the same (a client that reads nothing).
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// The window control frames are counted in.
const WINDOW: Duration = Duration::from_secs(1);

/// What every connection of a listener is held to.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Control frames (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty
    /// DATA) a connection may send in one second, beyond two for each
    /// DATA or HEADERS frame the server sent it.
    pub control_frames_per_second: u32,
    /// How long a connection asked to close waits for its calls before it
    /// is closed anyway (a client that keeps opening calls after the
    /// GOAWAY): the request deadline, which bounds every call.
    pub drain_timeout: Duration,
}

/// A handle to ask one connection to close once its calls are done.
#[derive(Debug, Default)]
pub struct Drain {
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl Drain {
    /// Sends the connection a GOAWAY (NO_ERROR) at once; it is closed when
    /// the calls it had opened are done.
    pub fn close_after_calls(&self) {
        self.requested.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// One frame's header.
#[derive(Debug, Clone, Copy)]
struct Header {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Header {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & ALL_STREAMS,
        }
    }
}

/// Finds the frame headers in one direction's bytes, wherever the reads or
/// writes cut them.
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of the current frame's payload (or of the preface) not seen.
    skip: usize,
    partial: [u8; HEADER_LEN],
    filled: usize,
}

impl Framer {
    /// Whether the bytes seen so far end with a whole frame.
    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.filled == 0
    }

    /// Calls `each` with every frame header that `bytes` completes.
    #[inline]
    fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(Header)) {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            }
            if bytes.is_empty() {
                return;
            }
            let header = if self.filled == 0 && bytes.len() >= HEADER_LEN {
                let header = Header::parse(bytes);
                bytes = &bytes[HEADER_LEN..];
                header
            } else {
                let n = (HEADER_LEN - self.filled).min(bytes.len());
                self.partial[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                self.filled += n;
                bytes = &bytes[n..];
                if self.filled < HEADER_LEN {
                    return;
                }
                self.filled = 0;
                Header::parse(&self.partial)
            };
            self.skip = header.len as usize;
            each(header);
        }
    }
}

/// The calls (client streams) the server has not finished.
#[derive(Debug, Default)]
struct Calls {
    /// Kept only for a connection that can be drained: no other needs it.
    tracked: bool,
    open: Vec<u32>,
    /// The highest stream the client opened.
    highest: u32,
}

impl Calls {
    fn opened(&mut self, stream: u32) {
        // A client's trailers (a second HEADERS) open nothing.
        if stream > self.highest {
            self.highest = stream;
            if self.tracked {
                self.open.push(stream);
            }
        }
    }

    fn ended(&mut self, stream: u32) {
        if !self.tracked {
            return;
        }
        if let Some(at) = self.open.iter().rposition(|s| *s == stream) {
            self.open.swap_remove(at);
        }
    }
}

/// A connection's allowance of control frames.
#[derive(Debug)]
struct Allowance {
    limit: u32,
    left: u32,
    window_start: Instant,
}

impl Allowance {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            left: limit,
            window_start: Instant::now(),
        }
    }

    /// Takes one; false when none is left in this window. The clock is
    /// read only when the allowance runs out.
    fn take(&mut self) -> bool {
        if self.left == 0 {
            let now = Instant::now();
            if now.duration_since(self.window_start) < WINDOW {
                return false;
            }
            self.window_start = now;
            self.left = self.limit;
        }
        self.left -= 1;
        true
    }

    /// A DATA or HEADERS frame the server sent: the client's window
    /// updates for it (its stream's and the connection's) are not held
    /// against it.
    fn give(&mut self) {
        self.left = (self.left + 2).min(self.limit);
    }
}

/// Where a connection is in its closing.
enum Closing {
    Open,
    /// A GOAWAY to write at the next boundary between the server's
    /// frames; then `then`.
    GoAway {
        frame: [u8; 17],
        written: usize,
        then: AfterGoAway,
    },
    /// GOAWAY sent: the calls it let finish run; at `deadline` it closes
    /// all the same.
    Draining {
        deadline: Pin<Box<Sleep>>,
    },
    /// Flushing and sending the TLS close and FIN.
    ShuttingDown {
        deadline: Pin<Box<Sleep>>,
    },
    /// Reading and dropping what the client still sends, so that closing
    /// with unread bytes does not reset the connection before the client
    /// has read the GOAWAY, until it hangs up or `deadline`.
    Lingering {
        deadline: Pin<Box<Sleep>>,
    },
    Closed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterGoAway {
    /// A flood: close at once.
    Close,
    /// Let the calls opened so far finish, then a second GOAWAY naming the
    /// last of them, then close.
    Drain,
    /// The second GOAWAY of a drain was sent: close.
    Drained,
}

/// What a connection speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// As far as it has sent, the HTTP/2 preface: `matched` bytes of it.
    Sniffing {
        matched: usize,
    },
    Http2,
    Http1,
}

/// A connection whose HTTP/2 frames are watched; see the module's text.
pub struct Watched<IO> {
    io: IO,
    protocol: Protocol,
    inbound: Framer,
    outbound: Framer,
    /// Whether the server has started its frames (its SETTINGS comes
    /// first; nothing may go before it).
    server_started: bool,
    calls: Calls,
    allowance: Allowance,
    closing: Closing,
    drain: Option<Arc<Drain>>,
    drain_timeout: Duration,
    listener: &'static str,
    peer: Option<SocketAddr>,
}

impl<IO> fmt::Debug for Watched<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("listener", &self.listener)
            .field("peer", &self.peer)
            .field("calls", &self.calls.open.len())
            .finish_non_exhaustive()
    }
}

impl<IO> Watched<IO> {
    /// `io`, watched under `limits`; with `drain`, it can be asked to
    /// close. `listener` and `peer` name it in log lines.
    pub fn new(
        io: IO,
        limits: FrameLimits,
        drain: Option<Arc<Drain>>,
        listener: &'static str,
        peer: Option<SocketAddr>,
    ) -> Self {
        Self {
            io,
            protocol: Protocol::Sniffing { matched: 0 },
            inbound: Framer::default(),
            outbound: Framer::default(),
            server_started: false,
            calls: Calls {
                tracked: drain.is_some(),
                ..Calls::default()
            },
            allowance: Allowance::new(limits.control_frames_per_second),
            closing: Closing::Open,
            drain,
            drain_timeout: limits.drain_timeout,
            listener,
            peer,
        }
    }

    /// Reads the client's frames in `bytes`; false when it has sent more
    /// control frames than it may.
    fn inbound(&mut self, mut bytes: &[u8]) -> bool {
        if let Protocol::Sniffing { matched } = &mut self.protocol {
            let n = (PREFACE.len() - *matched).min(bytes.len());
            if bytes[..n] != PREFACE[*matched..*matched + n] {
                self.protocol = Protocol::Http1;
                return true;
            }
            *matched += n;
            bytes = &bytes[n..];
            if *matched < PREFACE.len() {
                return true;
            }
            self.protocol = Protocol::Http2;
        }
        if self.protocol != Protocol::Http2 {
            return true;
        }
        let (calls, allowance) = (&mut self.calls, &mut self.allowance);
        let mut calm = true;
        self.inbound.feed(bytes, |h| match h.kind {
            HEADERS => calls.opened(h.stream),
            RST_STREAM => calls.ended(h.stream),
            SETTINGS | PING | WINDOW_UPDATE | PRIORITY => calm &= allowance.take(),
            DATA if h.len == 0 && h.flags & END_STREAM == 0 => calm &= allowance.take(),
            _ => {}
        });
        calm
    }

    /// Reads the server's frames in `bytes`.
    fn outbound(&mut self, bytes: &[u8]) {
        // An HTTP/2-only server writes its SETTINGS before the client's
        // preface is read; an HTTP/1.1 server writes nothing before a request.
        if self.protocol == Protocol::Http1 {
            return;
        }
        let (calls, allowance) = (&mut self.calls, &mut self.allowance);
        let mut started = false;
        self.outbound.feed(bytes, |h| {
            started = true;
            match h.kind {
                DATA | HEADERS => {
                    allowance.give();
                    if h.flags & END_STREAM != 0 {
                        calls.ended(h.stream);
                    }
                }
                RST_STREAM => calls.ended(h.stream),
                _ => {}
            }
        });
        self.server_started |= started;
    }

    fn go_away(&mut self, code: u32, last_stream: u32, then: AfterGoAway) {
        let mut frame = [0; 17];
        frame[..HEADER_LEN].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        frame[9..13].copy_from_slice(&last_stream.to_be_bytes());
        frame[13..].copy_from_slice(&code.to_be_bytes());
        self.closing = Closing::GoAway {
            frame,
            written: 0,
            then,
        };
    }

    fn flooded(&mut self) {
        tracing::warn!(
            listener = self.listener,
            peer = %PeerName(self.peer),
            limit_per_second = self.allowance.limit,
            "closing a connection that sent too many HTTP/2 control frames (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA): GOAWAY ENHANCE_YOUR_CALM"
        );
        self.go_away(ENHANCE_YOUR_CALM, self.calls.highest, AfterGoAway::Close);
    }

    /// Whether h2 still gets the client's frames: open, or letting calls
    /// finish.
    fn serving(&self) -> bool {
        match &self.closing {
            Closing::Open | Closing::Draining { .. } => true,
            Closing::GoAway { then, .. } => *then == AfterGoAway::Drain,
            _ => false,
        }
    }

    fn deadline(after: Duration) -> Pin<Box<Sleep>> {
        Box::pin(tokio::time::sleep(after))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Watched<IO> {
    /// Writes the pending GOAWAY if the server's frames are at a boundary;
    /// Ready once nothing of it is left to write.
    fn poll_go_away(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Closing::GoAway {
            frame,
            written,
            then,
        } = &mut self.closing
        else {
            return Poll::Ready(Ok(()));
        };
        if !self.server_started || !self.outbound.at_boundary() {
            // h2 is inside a frame: the GOAWAY follows it (poll_write).
            return Poll::Pending;
        }
        while *written < frame.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &frame[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        self.closing = match *then {
            AfterGoAway::Drain => Closing::Draining {
                deadline: Self::deadline(self.drain_timeout),
            },
            AfterGoAway::Close | AfterGoAway::Drained => Closing::ShuttingDown {
                deadline: Self::deadline(CLOSE_WITHIN),
            },
        };
        Poll::Ready(Ok(()))
    }

    /// Moves the closing on as far as it goes now; Ready(()) once the
    /// connection is to be reported closed to hyper.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.closing {
                Closing::Open => return Poll::Pending,
                Closing::GoAway { .. } => {
                    if self.poll_go_away(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Closing::Draining { deadline } => {
                    let done = self.calls.open.is_empty() && self.outbound.at_boundary();
                    if !done && deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.go_away(NO_ERROR, self.calls.highest, AfterGoAway::Drained);
                }
                Closing::ShuttingDown { deadline } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.closing = Closing::Closed;
                        continue;
                    }
                    let io = &mut self.io;
                    let done = match Pin::new(&mut *io).poll_flush(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => true,
                        Poll::Ready(Ok(())) => {
                            !matches!(Pin::new(io).poll_shutdown(cx), Poll::Pending)
                        }
                    };
                    if !done {
                        return Poll::Pending;
                    }
                    if let Closing::ShuttingDown { deadline } =
                        std::mem::replace(&mut self.closing, Closing::Closed)
                    {
                        self.closing = Closing::Lingering { deadline };
                    }
                }
                Closing::Lingering { deadline } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.closing = Closing::Closed;
                        continue;
                    }
                    let mut scratch = [0; 1024];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                        Poll::Ready(_) => self.closing = Closing::Closed,
                    }
                }
                Closing::Closed => return Poll::Ready(()),
            }
        }
    }
}

/// A peer's address in a log line.
struct PeerName(Option<SocketAddr>);

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

impl<IO: Connected> Connected for Watched<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(drain) = &this.drain {
            drain.waker.register(cx.waker());
            if matches!(this.closing, Closing::Open)
                && drain.requested.load(Ordering::Acquire)
                && this.protocol == Protocol::Http1
            {
                tracing::info!(
                    listener = this.listener,
                    peer = %PeerName(this.peer),
                    "closing an HTTP/1.1 connection at once (HTTP/1.1 has no GOAWAY)"
                );
                this.closing = Closing::ShuttingDown {
                    deadline: Self::deadline(CLOSE_WITHIN),
                };
            }
            if matches!(this.closing, Closing::Open) && drain.requested.load(Ordering::Acquire) {
                tracing::info!(
                    listener = this.listener,
                    peer = %PeerName(this.peer),
                    calls_in_progress = this.calls.open.len(),
                    "closing a connection once its calls are done: GOAWAY sent"
                );
                this.go_away(NO_ERROR, ALL_STREAMS, AfterGoAway::Drain);
            }
        }
        if !matches!(this.closing, Closing::Open) {
            if this.poll_close(cx).is_ready() {
                // End of stream: h2 closes the connection.
                return Poll::Ready(Ok(()));
            }
            if !this.serving() {
                // A flood's bytes, or what comes after the last GOAWAY,
                // are not given to h2.
                return Poll::Pending;
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let calm = this.inbound(&buf.filled()[before..]);
        // Never while a GOAWAY is being written: that one goes whole first.
        if !calm && matches!(this.closing, Closing::Open | Closing::Draining { .. }) {
            this.flooded();
            // Written as soon as h2's frames allow.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Watched<IO> {
    /// Before h2 writes: the pending GOAWAY goes first when h2's frames are
    /// at a boundary. Ready(true): what h2 writes is dropped (the
    /// connection is closing and its client was told).
    fn poll_before_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        match &self.closing {
            Closing::Open | Closing::Draining { .. } => Poll::Ready(Ok(false)),
            Closing::GoAway { .. } if !self.server_started || !self.outbound.at_boundary() => {
                Poll::Ready(Ok(false))
            }
            Closing::GoAway { then, .. } => {
                let then = *then;
                ready!(self.poll_go_away(cx))?;
                // The read side moves the closing on from here.
                cx.waker().wake_by_ref();
                Poll::Ready(Ok(then != AfterGoAway::Drain))
            }
            _ => Poll::Ready(Ok(true)),
        }
    }

    fn wrote(&mut self, bytes: &[u8], cx: &mut Context<'_>) {
        self.outbound(bytes);
        let next_step = match self.closing {
            Closing::Open => false,
            Closing::Draining { .. } => self.calls.open.is_empty(),
            _ => self.outbound.at_boundary(),
        };
        if next_step {
            // The read side moves the closing on.
            cx.waker().wake_by_ref();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.closing, Closing::Open) && ready!(this.poll_before_write(cx))? {
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.wrote(&buf[..n], cx);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.closing, Closing::Open) && ready!(this.poll_before_write(cx))? {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.wrote(&b[..take], cx);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.closing {
            Closing::Open | Closing::Draining { .. } | Closing::GoAway { .. } => {
                Pin::new(&mut this.io).poll_flush(cx)
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.closing {
            Closing::Open | Closing::Draining { .. } | Closing::GoAway { .. } => {
                Pin::new(&mut this.io).poll_shutdown(cx)
            }
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    const SETTINGS_FRAME: [u8; 9] = [0, 0, 0, SETTINGS, 0, 0, 0, 0, 0];

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn watched(limit: u32, drain: Option<Arc<Drain>>) -> (Watched<DuplexStream>, DuplexStream) {
        let (server, client) = duplex(64 * 1024);
        let limits = FrameLimits {
            control_frames_per_second: limit,
            drain_timeout: Duration::from_secs(5),
        };
        (Watched::new(server, limits, drain, "test", None), client)
    }

    /// The frames the client reads until the server hangs up: type,
    /// stream and payload of each.
    async fn frames_read(client: &mut DuplexStream) -> Vec<(u8, u32, Vec<u8>)> {
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).await.unwrap();
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let h = Header::parse(&bytes[at..]);
            let payload = bytes[at + HEADER_LEN..at + HEADER_LEN + h.len as usize].to_vec();
            frames.push((h.kind, h.stream, payload));
            at += HEADER_LEN + h.len as usize;
        }
        assert_eq!(at, bytes.len(), "a frame was cut");
        frames
    }

    fn go_away(last_stream: u32, code: u32) -> Vec<u8> {
        [last_stream.to_be_bytes(), code.to_be_bytes()].concat()
    }

    #[tokio::test]
    async fn a_flood_gets_goaway_enhance_your_calm_between_two_frames_then_the_connection_closes() {
        let (mut server, mut client) = watched(10, None);
        server.write_all(&SETTINGS_FRAME).await.unwrap();
        // h2 is in the middle of a frame when the flood is seen.
        let data = frame(DATA, 0, 1, b"0123456789");
        server.write_all(&data[..14]).await.unwrap();
        let mut flood = PREFACE.to_vec();
        flood.extend_from_slice(&frame(HEADERS, 0x4, 1, b"h"));
        for _ in 0..11 {
            flood.extend_from_slice(&frame(PING, 0, 0, b"12345678"));
        }
        client.write_all(&flood).await.unwrap();
        let mut buf = vec![0; 4096];
        assert_eq!(server.read(&mut buf).await.unwrap(), flood.len());
        let after = tokio::spawn(async move {
            // h2 ends its frame and writes another; then reads.
            server.write_all(&data[14..]).await.unwrap();
            server.write_all(&SETTINGS_FRAME).await.unwrap();
            server.flush().await.unwrap();
            let mut buf = vec![0; 64];
            server.read(&mut buf).await.unwrap()
        });
        let frames = frames_read(&mut client).await;
        client.shutdown().await.unwrap();
        assert_eq!(after.await.unwrap(), 0, "h2 reads the end of the stream");
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [SETTINGS, DATA, GOAWAY], "{frames:?}");
        assert_eq!(frames[2].2, go_away(1, ENHANCE_YOUR_CALM));
    }

    #[tokio::test]
    async fn frames_the_server_sends_allow_the_client_its_window_updates() {
        let (mut server, mut client) = watched(10, None);
        server.write_all(&SETTINGS_FRAME).await.unwrap();
        let mut buf = vec![0; 64 * 1024];
        client.write_all(PREFACE).await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), PREFACE.len());
        // Far more window updates than the limit, each after a DATA frame.
        for _ in 0..100 {
            server.write_all(&frame(DATA, 0, 1, b"x")).await.unwrap();
            let update = frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
            client.write_all(&update).await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), update.len());
        }
        assert!(matches!(server.closing, Closing::Open));
    }

    #[tokio::test]
    async fn a_drained_connection_finishes_its_calls_then_closes() {
        let drain = Arc::new(Drain::default());
        let (mut server, mut client) = watched(100, Some(drain.clone()));
        server.write_all(&SETTINGS_FRAME).await.unwrap();
        let mut request = PREFACE.to_vec();
        request.extend_from_slice(&frame(HEADERS, 0x4, 1, b"h"));
        client.write_all(&request).await.unwrap();
        let mut buf = vec![0; 4096];
        assert_eq!(server.read(&mut buf).await.unwrap(), request.len());

        drain.close_after_calls();
        let reader = tokio::spawn(async move {
            // h2's read, pending while the call runs: the GOAWAY goes out.
            let mut buf = vec![0; 4096];
            let n = server.read(&mut buf).await.unwrap();
            (server, buf[..n].to_vec())
        });
        // The call's message arrives after the GOAWAY and reaches h2.
        let message = frame(DATA, END_STREAM, 1, b"m");
        client.write_all(&message).await.unwrap();
        let (mut server, read) = reader.await.unwrap();
        assert_eq!(read, message);
        // The call's answer ends it; then the connection closes.
        server
            .write_all(&frame(HEADERS, END_STREAM | 0x4, 1, b"t"))
            .await
            .unwrap();
        let closing = tokio::spawn(async move {
            let mut buf = vec![0; 64];
            server.read(&mut buf).await.unwrap()
        });
        let frames = frames_read(&mut client).await;
        client.shutdown().await.unwrap();
        assert_eq!(closing.await.unwrap(), 0);
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [SETTINGS, GOAWAY, HEADERS, GOAWAY], "{frames:?}");
        assert_eq!(frames[1].2, go_away(ALL_STREAMS, NO_ERROR));
        assert_eq!(frames[3].2, go_away(1, NO_ERROR));
    }
    #[tokio::test]
    async fn an_http1_connection_passes_unwatched_and_closes_at_once_when_drained() {
        let drain = Arc::new(Drain::default());
        let (mut server, mut client) = watched(1, Some(drain.clone()));
        // Pipelined requests whose bytes, read as frames, would be a flood.
        let request = b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n".repeat(50);
        client.write_all(&request).await.unwrap();
        let mut buf = vec![0; 8192];
        let mut read = 0;
        while read < request.len() {
            read += server.read(&mut buf).await.unwrap();
        }
        assert!(matches!(server.closing, Closing::Open));
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        server.write_all(answer).await.unwrap();
        // HTTP/1.1 has no GOAWAY: asked to go, it closes, nothing written.
        drain.close_after_calls();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes, answer);
    }
}
