//! [`Shutdown`]: what each listener and background task of a
//! [`super::Runtime`] holds to learn that it must stop.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;

/// Resolves once the [`super::Runtime`] that made it is told to stop (or is
/// dropped). Every listener and background task holds one.
pub struct Shutdown(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Shutdown {
    pub(super) fn new(mut stop: watch::Receiver<bool>) -> Self {
        Self(Box::pin(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }))
    }
}

impl Future for Shutdown {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").finish_non_exhaustive()
    }
}
