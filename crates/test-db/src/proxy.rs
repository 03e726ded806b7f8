//! A TCP proxy on 127.0.0.1 in front of one address, whose behaviour a
//! test switches while connections are open, to cut one node off the
//! database for real:
//!
//! - [`ProxyMode::Pass`] forwards bytes both ways;
//! - [`ProxyMode::BlackHole`] accepts and keeps connections open but
//!   forwards nothing in either direction, a silent partition: reads and
//!   writes hang, no error ever comes;
//! - [`ProxyMode::Reset`] closes every open connection with a TCP RST and
//!   resets every new one as soon as it is accepted;
//! - [`ProxyMode::DropReplies`] forwards what clients send and throws
//!   away what the target answers: the request arrives and is acted on,
//!   the response is lost on the way back;
//! - [`ProxyMode::ResetAfterCommit`] passes Postgres traffic until a client
//!   sends `COMMIT` (as tokio-postgres ends a transaction, a simple query),
//!   then forwards it, gives the server a moment to commit, and resets the
//!   connection without passing on the answer: a commit whose outcome the
//!   client cannot know.
//!
//! Switching back to `Pass` resumes the connections a black hole held,
//! bytes queued meanwhile included, as when a partition heals.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Pass,
    BlackHole,
    Reset,
    DropReplies,
    ResetAfterCommit,
}

/// A running proxy; dropping it closes everything it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`,
    /// starting in [`ProxyMode::Pass`]. Its tasks run on the current
    /// runtime.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds a free port on 127.0.0.1");
        let addr = listener.local_addr().expect("a bound address");
        let (mode, _) = watch::channel(ProxyMode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept_loop(
            listener,
            target,
            mode.clone(),
            accepted.clone(),
            held.clone(),
        ));
        FaultProxy {
            addr,
            target,
            mode,
            accepted,
            held,
            acceptor,
        }
    }

    /// The proxy's own address: connect here instead of to the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches every open connection and every new one to `mode`.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Connections accepted so far, in any mode.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections held in a [`ProxyMode::BlackHole`] right now: each
    /// reads nothing from either side until the mode changes, so a test
    /// that sees one held knows nothing passes it.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        // The connections' tasks end when they see the sender gone.
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        if *mode.borrow() == ProxyMode::Reset {
            reset(client);
            continue;
        }
        tokio::spawn(relay(client, target, mode.subscribe(), held.clone()));
    }
}

/// How long [`ProxyMode::ResetAfterCommit`] lets the server work on a
/// commit before it cuts the connection: ample for a local commit.
const COMMIT_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Whether `bytes` hold a Postgres simple-query message `COMMIT`.
fn is_commit(bytes: &[u8]) -> bool {
    const QUERY: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
    bytes.windows(QUERY.len()).any(|w| w == QUERY)
}

/// Closes `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One connection, following the mode until either side closes.
async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
    held: Arc<AtomicUsize>,
) {
    let mut client = client;
    let mut upstream: Option<TcpStream> = None;
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_upstream = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Reset => break,
            ProxyMode::BlackHole => {
                // Hold both sockets, read nothing, until the mode changes
                // or the proxy is dropped.
                held.fetch_add(1, Ordering::SeqCst);
                let changed = mode.changed().await;
                held.fetch_sub(1, Ordering::SeqCst);
                if changed.is_err() {
                    break;
                }
            }
            ProxyMode::Pass | ProxyMode::DropReplies | ProxyMode::ResetAfterCommit => {
                // Connected lazily: a connection accepted during a black
                // hole reaches the target only once it heals.
                let up = match &mut upstream {
                    Some(up) => up,
                    None => match TcpStream::connect(target).await {
                        Ok(up) => upstream.insert(up),
                        Err(_) => break,
                    },
                };
                tokio::select! {
                    read = client.read(&mut from_client) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if up.write_all(&from_client[..n]).await.is_err() { break }
                            if current == ProxyMode::ResetAfterCommit && is_commit(&from_client[..n]) {
                                tokio::time::sleep(COMMIT_GRACE).await;
                                break;
                            }
                        }
                    },
                    read = up.read(&mut from_upstream) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) if current == ProxyMode::DropReplies => {}
                        Ok(n) => if client.write_all(&from_upstream[..n]).await.is_err() { break },
                    },
                    changed = mode.changed() => if changed.is_err() { break },
                }
            }
        }
    }
    // However it ended, the peers see a reset, as when a path dies.
    reset(client);
    if let Some(up) = upstream {
        reset(up);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    /// Waits until `proxy` holds `count` connections in its black hole.
    async fn until_held(proxy: &FaultProxy, count: usize) {
        let what = format!("the proxy holds {count} connections");
        crate::eventually(Duration::from_secs(5), &what, || async {
            proxy.held() == count
        })
        .await;
    }

    /// Checks that nothing came back on `stream`, and that it is open.
    fn assert_unanswered(stream: &TcpStream) {
        let mut buf = [0u8; 16];
        match stream.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a black hole answered or closed: {other:?}"),
        }
    }

    #[tokio::test]
    async fn passes_black_holes_heals_and_resets() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"one").await.unwrap(), b"one");

        proxy.set_mode(ProxyMode::BlackHole);
        // An open connection and a new one: both accepted and held (which
        // reads nothing from either side), neither answered.
        until_held(&proxy, 1).await;
        stream.write_all(b"two").await.unwrap();
        let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
        until_held(&proxy, 2).await;
        during.write_all(b"new").await.unwrap();
        assert_unanswered(&stream);
        assert_unanswered(&during);

        // Healed: what was sent meanwhile arrives, on both connections.
        proxy.set_mode(ProxyMode::Pass);
        for (stream, sent) in [(&mut stream, b"two"), (&mut during, b"new")] {
            let mut back = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
                .await
                .expect("the healed proxy delivers what the black hole held")
                .unwrap();
            assert_eq!(&back, sent);
        }

        proxy.set_mode(ProxyMode::Reset);
        let mut buf = [0u8; 1];
        let reset = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a reset connection ends at once");
        assert_eq!(
            reset.map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::ConnectionReset
        );
        // New connections are accepted and reset at once.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), round_trip(&mut fresh, b"x"))
            .await
            .expect("a reset connection ends at once");
        assert!(outcome.is_err(), "a reset proxy answered: {outcome:?}");
        assert_eq!(proxy.accepted(), 3);

        proxy.set_mode(ProxyMode::Pass);
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, b"back").await.unwrap(), b"back");
    }
}
