//! A deadline for a request's message. tonic calls a service as soon as a
//! request's headers arrive and reads the message inside the call, so a
//! client that sends headers and then stalls holds a place under every
//! concurrency limit until the request timeout. This layer fails the
//! message's read `request_body_timeout` after the headers: the handler
//! answers `DEADLINE_EXCEEDED`, and hyper closes the stream.
//!
//! It costs nothing on the usual path: the timer is only set when a read
//! of the message has to wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;

/// Wraps each request's body with a deadline of `timeout` from the call.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeoutLayer {
    timeout: Duration,
}

impl BodyTimeoutLayer {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> tower::Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> BodyTimeout<S> {
        BodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S: tower::Service<http::Request<Body>>> tower::Service<http::Request<Body>>
    for BodyTimeout<S>
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        self.inner.call(request.map(|body| {
            Body::new(TimedBody {
                inner: body,
                deadline,
                timeout,
                timer: None,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A request body whose reads fail once its deadline has passed.
    struct TimedBody {
        #[pin]
        inner: Body,
        deadline: Instant,
        timeout: Duration,
        // Set on the first read that has to wait.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = *this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                "the request message did not arrive within {} ms of its headers",
                this.timeout.as_millis()
            ))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A service that reads the whole body, as a unary handler does.
    fn reader() -> BodyTimeout<
        impl tower::Service<
            http::Request<Body>,
            Response = Result<Bytes, Status>,
            Error = std::convert::Infallible,
        >,
    > {
        BodyTimeoutLayer::new(TIMEOUT).layer(tower::service_fn(
            |request: http::Request<Body>| async move {
                Ok(request.into_body().collect().await.map(|b| b.to_bytes()))
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_arrives_in_time_is_read_whole() {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Status>::new(4);
        let send = async move {
            tokio::time::sleep(TIMEOUT / 2).await;
            tx.send_data(Bytes::from_static(b"message")).await.unwrap();
        };
        let call = reader().oneshot(http::Request::new(Body::new(body)));
        let ((), read) = tokio::join!(send, call);
        let read = read.unwrap();
        assert_eq!(read.unwrap(), Bytes::from_static(b"message"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_the_deadline_with_deadline_exceeded() {
        let (_tx, body) = http_body_util::channel::Channel::<Bytes, Status>::new(4);
        let started = Instant::now();
        let read = reader()
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(Body::new(body)))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), TIMEOUT);
        let status = read.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("2000 ms"), "{status:?}");
    }
}
