//! The `LISTEN` side of the change feed: a connection of its own (not
//! from the pool, which recycles connections and would lose the `LISTEN`),
//! a task that drives it and forwards notifications, and the
//! [`ChangeListener`] that hands them out. The `NOTIFY` side is
//! `publish_change` in `feed.rs`; the payload format both sides agree on
//! is here.

use std::ops::ControlFlow;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Connection};
use vilvik_keys_domain::KeyPrefix;

use super::{CHANGE_CHANNEL, map_err, tls};
use crate::{ChangeListener, OutageKind, Result, StoreError};

/// The `application_name` of the listener's connection, so operators (and
/// tests) can find it in `pg_stat_activity`.
const LISTENER_APPLICATION_NAME: &str = "vilvik-keys-listener";
/// Notifications the listener buffers for a slow consumer. Past that it
/// gives up (the consumer catches up with `changes_since`) rather than
/// stop reading the socket, which would make Postgres queue notifications
/// for it and, at worst, fail every writer's `NOTIFY`.
pub(super) const LISTENER_BUFFER: usize = 65_536;
/// TCP keepalive on the listener's socket, a second line of defence
/// against a peer that vanished without closing the connection.
const LISTENER_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const LISTENER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const LISTENER_KEEPALIVE_RETRIES: u32 = 3;

/// How the change listener watches its connection. The defaults give up a
/// connection that went silent within about ten seconds, well inside the
/// verify nodes' default staleness bound; tests set them small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerOptions {
    /// After this long without a message the listener checks that its
    /// connection still answers...
    pub heartbeat: Duration,
    /// ...and gives up on it if no answer came this long after that.
    pub heartbeat_timeout: Duration,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens the listener's connection with the pool's `config` and TLS
/// connector, `LISTEN`s on [`CHANGE_CHANNEL`] and spawns the task that
/// drives it; see `KeySource::listen` on `PostgresStore` for what the
/// caller gets.
pub(super) async fn subscribe(
    config: &tokio_postgres::Config,
    tls: &tls::Connector,
    options: ListenerOptions,
) -> Result<Box<dyn ChangeListener>> {
    let mut config = config.clone();
    config
        .application_name(LISTENER_APPLICATION_NAME)
        .keepalives(true)
        .keepalives_idle(LISTENER_KEEPALIVE_IDLE)
        .keepalives_interval(LISTENER_KEEPALIVE_INTERVAL)
        .keepalives_retries(LISTENER_KEEPALIVE_RETRIES);
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(map_err)?;
    let (tx, rx) = mpsc::channel(LISTENER_BUFFER);
    {
        // The channel name is a constant identifier: nothing to quote.
        let sql = format!("LISTEN {CHANGE_CHANNEL}");
        let subscribe = client.batch_execute(&sql);
        tokio::pin!(subscribe);
        loop {
            tokio::select! {
                subscribed = &mut subscribe => {
                    subscribed.map_err(map_err)?;
                    break;
                }
                message = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                    if let ControlFlow::Break(stopped) = forward(message, &tx) {
                        return Err(stopped);
                    }
                }
            }
        }
    }
    let task = tokio::spawn(run_listener(client, connection, tx, options));
    Ok(Box::new(PostgresChangeListener {
        notifications: rx,
        task: Some(task),
        ended: false,
    }))
}

/// What a change notification carries: `<seq>:<prefix>`.
pub(super) fn notification_payload(seq: i64, prefix: &KeyPrefix) -> String {
    format!("{seq}:{prefix}")
}

/// The inverse of [`notification_payload`].
pub(super) fn parse_notification(payload: &str) -> Result<(i64, KeyPrefix)> {
    let malformed = || {
        StoreError::internal(format!(
            "malformed notification on {CHANGE_CHANNEL}: {payload:?} is not <seq>:<prefix>"
        ))
    };
    let (seq, prefix) = payload.split_once(':').ok_or_else(malformed)?;
    let seq: i64 = seq.parse().map_err(|_| malformed())?;
    let prefix: KeyPrefix = prefix.parse().map_err(|_| malformed())?;
    Ok((seq, prefix))
}
/// Why a listener stopped.
#[derive(Debug, thiserror::Error)]
enum ListenerError {
    #[error("the change listener's connection closed")]
    Closed,
    #[error(
        "the change listener fell more than {0} notifications behind; resubscribe and catch up with changes_since"
    )]
    FellBehind(usize),
    #[error("the change listener's connection did not answer a heartbeat within {0:?}")]
    Silent(Duration),
}

fn listener_stopped(why: ListenerError) -> StoreError {
    StoreError::unavailable(OutageKind::ConnectionLost, why)
}

/// Handles one message from the listener's connection: forwards a change
/// notification's payload, or says why the subscription is over.
fn forward(
    message: Option<std::result::Result<AsyncMessage, tokio_postgres::Error>>,
    tx: &mpsc::Sender<String>,
) -> ControlFlow<StoreError> {
    use mpsc::error::TrySendError;
    match message {
        Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANGE_CHANNEL => {
            match tx.try_send(n.payload().to_owned()) {
                Ok(()) => ControlFlow::Continue(()),
                // Never stop reading the socket for a slow consumer:
                // Postgres would queue notifications for this session and,
                // at worst, fail every writer's NOTIFY.
                Err(TrySendError::Full(_)) => {
                    ControlFlow::Break(listener_stopped(ListenerError::FellBehind(LISTENER_BUFFER)))
                }
                Err(TrySendError::Closed(_)) => {
                    ControlFlow::Break(listener_stopped(ListenerError::Closed))
                }
            }
        }
        Some(Ok(AsyncMessage::Notice(notice))) => {
            tracing::debug!(notice = %notice, "notice on the change listener's connection");
            ControlFlow::Continue(())
        }
        Some(Ok(_)) => ControlFlow::Continue(()),
        // Whatever the error (terminated backend, reset socket, server
        // shutdown), the subscription is gone: the caller resubscribes.
        Some(Err(e)) => ControlFlow::Break(StoreError::unavailable(OutageKind::ConnectionLost, e)),
        None => ControlFlow::Break(listener_stopped(ListenerError::Closed)),
    }
}

/// Drives the listener's connection until it fails or the listener is
/// dropped; returns why it stopped. Returning drops `tx`, which closes the
/// channel, so [`PostgresChangeListener::next`] learns of it.
async fn run_listener<S, T>(
    client: Client,
    mut connection: Connection<S, T>,
    tx: mpsc::Sender<String>,
    options: ListenerOptions,
) -> StoreError
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut last_heard = Instant::now();
    let mut heartbeat = None;
    let stopped = loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                if let ControlFlow::Break(stopped) = forward(message, &tx) {
                    break stopped;
                }
                last_heard = Instant::now();
            }
            () = tokio::time::sleep_until(last_heard + options.heartbeat), if heartbeat.is_none() => {
                heartbeat = Some(Box::pin(tokio::time::timeout(
                    options.heartbeat_timeout,
                    client.simple_query(""),
                )));
            }
            answer = async { heartbeat.as_mut().expect("guarded by the condition").await },
                if heartbeat.is_some() =>
            {
                heartbeat = None;
                match answer {
                    Ok(Ok(_)) => last_heard = Instant::now(),
                    Ok(Err(e)) => break StoreError::unavailable(OutageKind::ConnectionLost, e),
                    Err(_) => {
                        break listener_stopped(ListenerError::Silent(options.heartbeat_timeout));
                    }
                }
            }
            () = tx.closed() => {
                // The listener was dropped: end the session politely
                // (dropping the client sends Terminate), briefly.
                drop(heartbeat);
                drop(client);
                end_session(&mut connection).await;
                return listener_stopped(ListenerError::Closed);
            }
        }
    };
    tracing::debug!(error = %stopped, "change listener stopped");
    stopped
}

/// Reads what the server still sends until it ends the session, for at
/// most a second. `None` and an error are both the connection's last word:
/// polled again after an error, a closed socket answers at once and for
/// ever, and the timeout would never be looked at.
async fn end_session<S, T>(connection: &mut Connection<S, T>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {}
    })
    .await;
}

/// A `LISTEN` subscription on a connection of its own; see
/// [`subscribe`]. Dropping it closes the connection.
struct PostgresChangeListener {
    notifications: mpsc::Receiver<String>,
    /// The task driving the connection; its output says why it ended.
    task: Option<JoinHandle<StoreError>>,
    /// Set once a malformed notification ended the subscription.
    ended: bool,
}

impl std::fmt::Debug for PostgresChangeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresChangeListener")
            .field("ended", &self.ended)
            .field("buffered", &self.notifications.len())
            .finish_non_exhaustive()
    }
}

/// `next` is cancel-safe: it only awaits the channel and the task's
/// handle, both of which can be polled again.
#[async_trait]
impl ChangeListener for PostgresChangeListener {
    async fn next(&mut self) -> Result<(i64, KeyPrefix)> {
        if self.ended {
            return Err(listener_stopped(ListenerError::Closed));
        }
        match self.notifications.recv().await {
            Some(payload) => parse_notification(&payload).inspect_err(|_| {
                // Something else speaks on our channel: stop trusting it.
                // Closing the channel makes the task end the session.
                self.ended = true;
                self.notifications.close();
            }),
            // The task ended and dropped its sender: ask it why.
            None => Err(match &mut self.task {
                Some(task) => {
                    let stopped = task.await;
                    self.task = None;
                    stopped.unwrap_or_else(|e| {
                        StoreError::internal_from("the change listener task failed", e)
                    })
                }
                None => listener_stopped(ListenerError::Closed),
            }),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A session the server closed first ends at once, rather than
    /// spinning on the closed socket past its deadline. The socket here
    /// answers outside tokio's cooperative budget, as a TLS stream that
    /// saw the end of its input does, so nothing else would stop the spin.
    #[test]
    fn ending_a_session_the_server_closed_returns() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (done, ended) = std::sync::mpsc::channel();
        // A thread of its own: if the session spins, it spins there, and
        // the test still fails after its deadline.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (ours, mut server) = tokio::io::duplex(4096);
                let handshake = async move {
                    // The startup message: its length, then the rest.
                    let length = server.read_i32().await.unwrap();
                    let mut rest = vec![0; usize::try_from(length).unwrap() - 4];
                    server.read_exact(&mut rest).await.unwrap();
                    // AuthenticationOk, then ReadyForQuery (idle).
                    let answer = [b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'];
                    server.write_all(&answer).await.unwrap();
                    server
                };
                let config: tokio_postgres::Config = "user=vilvik".parse().unwrap();
                let connect = config.connect_raw(ours, tokio_postgres::NoTls);
                let (server, connected) = tokio::join!(handshake, connect);
                let (client, mut connection) = connected.unwrap();
                drop(server);
                drop(client);
                tokio::task::unconstrained(end_session(&mut connection)).await;
            });
            let _ = done.send(());
        });
        ended
            .recv_timeout(Duration::from_secs(5))
            .expect("the session ends within its deadline");
    }

    #[test]
    fn notification_payloads_round_trip() {
        let prefix: KeyPrefix = "vlk_AbCd0123".parse().unwrap();
        let payload = notification_payload(42, &prefix);
        assert_eq!(payload, "42:vlk_AbCd0123");
        assert_eq!(parse_notification(&payload).unwrap(), (42, prefix));
    }

    #[test]
    fn a_malformed_notification_is_an_internal_error() {
        for payload in [
            "",
            "vlk_AbCd0123",
            "x:vlk_AbCd0123",
            "42:",
            "42:not-a-prefix",
            ":vlk_AbCd0123",
        ] {
            let err = parse_notification(payload).unwrap_err();
            assert!(
                matches!(err, StoreError::Internal(..)),
                "{payload:?}: {err:?}"
            );
        }
    }
}
