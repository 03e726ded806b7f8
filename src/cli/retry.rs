//! Retries of a create or rotation whose outcome may be unknown: each try
//! sends the same request id, and the server answers a retry of a call
//! that did go through with that call's key and secret, so retrying is
//! safe. Nothing else is retried.

use std::time::Duration;

use super::errors::api_error;

/// Tries of a create or rotation whose answer was UNAVAILABLE or
/// DEADLINE_EXCEEDED (each with the same request id, so safe), and the
/// wait before the second; each further wait doubles.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Runs `call` until it succeeds, fails for good, or [`ATTEMPTS`] tries
/// are made; `method` and `request_id` name the call in what is printed.
pub(super) async fn with_retries<T, F, Fut>(
    method: &'static str,
    request_id: &str,
    mut call: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut retry = Retry::new(method, request_id);
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if retry.again(&status).await => {}
            Err(status) => return Err(retry.failed(status)),
        }
    }
}

/// Whether a call may have failed only on the way: the service was
/// unavailable, or no answer came in time (DEADLINE_EXCEEDED from the
/// server, or tonic's own timeout, which it reports as CANCELLED).
fn transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
        tonic::Code::Cancelled => status.message() == "Timeout expired",
        _ => false,
    }
}

/// The tries of one create or rotation, all with its request id.
struct Retry<'a> {
    method: &'static str,
    request_id: &'a str,
    attempt: u32,
    backoff: Duration,
}

impl<'a> Retry<'a> {
    fn new(method: &'static str, request_id: &'a str) -> Self {
        Self {
            method,
            request_id,
            attempt: 1,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Whether to try again after `status` ([`transient`], tries left);
    /// if so, says so on stderr and waits.
    async fn again(&mut self, status: &tonic::Status) -> bool {
        if !transient(status) || self.attempt >= ATTEMPTS {
            return false;
        }
        // Up to a quarter more, so that clients failed by one outage do
        // not all come back at once.
        let jitter = self.backoff.mul_f64(
            f64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos()
                    % 1_000,
            ) / 4_000.0,
        );
        let wait = self.backoff + jitter;
        eprintln!(
            "{}: {}; trying again with the same request id in {} ms (try {} of {ATTEMPTS})",
            self.method,
            api_error(status.clone()),
            wait.as_millis(),
            self.attempt + 1
        );
        tokio::time::sleep(wait).await;
        self.attempt += 1;
        self.backoff *= 2;
        true
    }

    /// The error to report when no more tries are made: with the request
    /// id when the outcome may be unknown, so the user can retry it.
    fn failed(&self, status: tonic::Status) -> anyhow::Error {
        let unknown = transient(&status);
        let error = api_error(status);
        if unknown {
            error.context(format!(
                "{} failed {} times; to retry it safely within 24 hours, run the same command \
                 again with --request-id {}",
                self.method, self.attempt, self.request_id
            ))
        } else {
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn creates_and_rotations_are_retried_only_when_the_outcome_may_be_unknown() {
        let mut retry = Retry::new("CreateKey", "3f0e6a8c-1d2b-4c5e-9f70-0123456789ab");
        let unavailable = tonic::Status::unavailable("the key store is unavailable");
        let started = tokio::time::Instant::now();
        for _ in 1..ATTEMPTS {
            assert!(retry.again(&unavailable).await);
        }
        assert!(!retry.again(&unavailable).await, "at most {ATTEMPTS} tries");
        // 200 + 400 + 800 + 1,600 ms, each up to a quarter more.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(3_000), "{waited:?}");
        assert!(waited <= Duration::from_millis(3_750), "{waited:?}");
        let failed = format!("{:#}", retry.failed(unavailable));
        assert!(
            failed.contains("--request-id 3f0e6a8c-1d2b-4c5e-9f70-0123456789ab"),
            "{failed}"
        );

        for status in [
            tonic::Status::deadline_exceeded("deadline"),
            tonic::Status::cancelled("Timeout expired"),
        ] {
            assert!(
                Retry::new("RotateKey", "id").again(&status).await,
                "{status:?}"
            );
        }
        for status in [
            tonic::Status::invalid_argument("name: is empty"),
            tonic::Status::cancelled("the user pressed ^C"),
            tonic::Status::resource_exhausted("the tier's cap"),
        ] {
            assert!(
                !Retry::new("CreateKey", "id").again(&status).await,
                "{status:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_tried_again_until_it_goes_through() {
        let mut tries = 0;
        let answer = with_retries("CreateKey", "id", || {
            tries += 1;
            let result = if tries < 3 {
                Err(tonic::Status::unavailable("the key store is unavailable"))
            } else {
                Ok(tonic::Response::new(tries))
            };
            async move { result }
        })
        .await
        .unwrap();
        assert_eq!(answer, 3);

        let mut tries = 0;
        let err = with_retries("RotateKey", "id", || {
            tries += 1;
            async { Err::<tonic::Response<()>, _>(tonic::Status::not_found("no such key")) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries, 1, "a refusal is final");
        assert_eq!(format!("{err:#}"), "NOT_FOUND: no such key");
    }
}
