//! The service behind the gateway: an HTTP server that answers every
//! request with the request's own head, so that a test reads what the
//! gateway let through (`X-Vilvik-Key-Id` and the rest), and counts them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The upstream, on a free port of 127.0.0.1; stopped when dropped.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    served: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the upstream");
        let addr = listener.local_addr().expect("its address");
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move { echo(stream, &counter).await });
            }
        });
        Self { addr, served, task }
    }

    /// How many requests reached it.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers one request (nginx sends one per connection, HTTP/1.0) with
/// its head as a text body, and closes.
async fn echo(mut stream: TcpStream, served: &AtomicUsize) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        assert!(head.len() < 64 * 1024, "a request head over 64 KiB");
    }
    served.fetch_add(1, Ordering::SeqCst);
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        head.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.write_all(&head).await;
    let _ = stream.shutdown().await;
}

/// The values of header `name` in a request head the upstream echoed.
pub fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}
