//! Counting the requests a listener is serving, so that a shutdown whose
//! grace period runs out can say how many it abandoned.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// The count, shared by every connection of the listeners it is layered on.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// A tower layer counting each request from its call until its
    /// response future is done or dropped.
    pub fn layer(&self) -> InFlightLayer {
        InFlightLayer(self.clone())
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLayer(InFlight);

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            in_flight: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    in_flight: InFlight,
}

impl<S: tower::Service<R>, R> tower::Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.in_flight.0.fetch_add(1, Ordering::Relaxed);
        CountedFuture {
            inner: self.inner.call(request),
            _guard: Guard(self.in_flight.0.clone()),
        }
    }
}

/// Takes one off the count when the request's future goes.
#[derive(Debug)]
struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        _guard: Guard,
    }
}

impl<F: Future> Future for CountedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    #[tokio::test]
    async fn a_request_counts_until_its_future_is_done_or_dropped() {
        let in_flight = InFlight::default();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let mut release = Some(release_rx);
        let mut service = in_flight
            .layer()
            .layer(tower::service_fn(move |wait: bool| {
                let release = if wait { release.take() } else { None };
                async move {
                    if let Some(release) = release {
                        let _ = release.await;
                    }
                    Ok::<_, std::convert::Infallible>(())
                }
            }));
        let waiting = service.ready().await.unwrap().call(true);
        let dropped = service.ready().await.unwrap().call(false);
        assert_eq!(in_flight.count(), 2);
        drop(dropped);
        assert_eq!(in_flight.count(), 1);
        let task = tokio::spawn(waiting);
        release_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(in_flight.count(), 0);
    }
}
