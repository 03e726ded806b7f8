//! gRPC clients over several HTTP/2 connections, the credentials admin
//! calls carry, and waiting out the admin rate limit.

use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use vilvik_keys::proto::{
    VerifyKeyRequest, VerifyKeyResponse, key_admin_client::KeyAdminClient,
    key_verify_client::KeyVerifyClient,
};

/// Opens `n` separate connections to `addr` (`host:port`).
pub async fn channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(connect(addr).await?);
    }
    Ok(out)
}

pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri.clone())
        .with_context(|| format!("'{addr}' is not an address: use host:port"))?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))
}

pub fn verify_client(channel: &Channel) -> KeyVerifyClient<Channel> {
    KeyVerifyClient::new(channel.clone())
}

pub fn admin_client(channel: &Channel) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(channel.clone())
}

pub fn verify_request(key: &str, scope: &str) -> VerifyKeyRequest {
    VerifyKeyRequest {
        key: key.to_owned(),
        required_scopes: vec![scope.to_owned()],
        client_ip: String::new(),
    }
}

/// The code's proto name without its prefix, e.g. `VALID`.
pub fn code_name(response: &VerifyKeyResponse) -> String {
    let name = response.code().as_str_name();
    name.strip_prefix("VERIFY_CODE_").unwrap_or(name).to_owned()
}

/// Reads a secrets file written by `seed`: one key per line.
pub fn read_keys(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read keys file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `message` with `authorization: Bearer <key>`.
pub fn bearer<T>(message: T, key: &str) -> Result<Request<T>, Status> {
    let mut request = Request::new(message);
    let value = format!("Bearer {key}")
        .parse()
        .map_err(|_| Status::invalid_argument("a key is not a valid header value"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// `message` sent with the operator token, acting on `account`; the audit
/// log names `bench@vilvik-keys-bench` as the actor.
pub fn operator<T>(message: T, token: &str, account: &str) -> Result<Request<T>, Status> {
    let mut request = bearer(message, token)?;
    let account = account
        .parse()
        .map_err(|_| Status::invalid_argument("the account is not a valid header value"))?;
    let metadata = request.metadata_mut();
    metadata.insert(vilvik_keys::headers::ACCOUNT, account);
    metadata.insert(
        vilvik_keys::headers::ACTOR,
        "bench@vilvik-keys-bench"
            .parse()
            .expect("a valid header value"),
    );
    Ok(request)
}

/// How long [`admitted`] waits in all for the admin rate limit.
const ADMISSION_PATIENCE: Duration = Duration::from_secs(30);

/// Sends `call` (built afresh for each try) until the admin rate limit
/// admits it: a refusal that names its wait (`retry-after-ms`) is tried
/// again after that wait, for at most 30 s in all; any other answer is
/// final. Returns the answer and when the try that got it was sent.
pub async fn admitted<T, F, Fut>(mut call: F) -> Result<(T, Instant), Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let deadline = tokio::time::Instant::now() + ADMISSION_PATIENCE;
    loop {
        let sent = Instant::now();
        match call().await {
            Ok(response) => return Ok((response.into_inner(), sent)),
            Err(status) => match retry_after(&status) {
                Some(wait) if tokio::time::Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await
                }
                _ => return Err(status),
            },
        }
    }
}

/// The wait a refusal by the admin rate limit names: RESOURCE_EXHAUSTED
/// with `retry-after-ms`. Other refusals (a tier's cap) name none.
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let ms = status
        .metadata()
        .get(vilvik_keys::headers::RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(retry_after_ms: Option<&str>) -> Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(ms) = retry_after_ms {
            metadata.insert(vilvik_keys::headers::RETRY_AFTER_MS, ms.parse().unwrap());
        }
        Status::with_metadata(Code::ResourceExhausted, "limited", metadata)
    }

    #[test]
    fn only_a_rate_limit_refusal_names_a_wait() {
        assert_eq!(
            retry_after(&refused(Some("1501"))),
            Some(Duration::from_millis(1501))
        );
        assert_eq!(retry_after(&refused(None)), None, "a tier's cap");
        assert_eq!(retry_after(&refused(Some("soon"))), None);
        assert_eq!(retry_after(&Status::unavailable("down")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_wait_out_the_rate_limit_and_no_other_refusal() {
        let mut tries = 0;
        let started = tokio::time::Instant::now();
        let (answer, _) = admitted(|| {
            tries += 1;
            let answer = if tries < 3 {
                Err(refused(Some("250")))
            } else {
                Ok(Response::new(tries))
            };
            async move { answer }
        })
        .await
        .unwrap();
        assert_eq!(answer, 3);
        assert!(started.elapsed() >= Duration::from_millis(500));

        let mut tries = 0;
        let status = admitted(|| {
            tries += 1;
            async { Err::<Response<()>, _>(refused(None)) }
        })
        .await
        .unwrap_err();
        assert_eq!((tries, status.code()), (1, Code::ResourceExhausted));

        let mut tries = 0;
        let status = admitted(|| {
            tries += 1;
            async { Err::<Response<()>, _>(refused(Some("60000"))) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries, 1, "a wait longer than the patience left is not made");
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
