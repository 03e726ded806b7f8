//! Requests that are not gRPC calls (the verify listener's HTTP face) are
//! answered in HTTP, never with a gRPC status. A gRPC status is HTTP 200
//! with `grpc-status` in its headers and an empty body: to a gateway's
//! forward-auth check (`/v1/authorize`), "allowed". tonic answers so
//! whatever it ends or refuses itself, whatever the request: a call its
//! deadline ended (`request_timeout_ms`, or the request's own
//! `grpc-timeout`) and one a layer shed (the listener's concurrency, a
//! connection's share); and admission answered so a request that only
//! claimed to be gRPC (`content-type: application/grpc` on `/v1/authorize`).
//!
//! So a request is a gRPC call only when its content type is gRPC *and* its
//! path is one of the listener's gRPC services ([`GrpcServices`]), and
//! [`HttpAnswerLayer`], outermost of the listener's layers, takes the gRPC
//! content type off any other (so that admission, which reads the content
//! type, reads it whole and refuses it in HTTP) and answers it itself, in
//! JSON, before tonic can:
//!
//! - one with a `grpc-timeout` header: 400 (tonic would end it at that
//!   deadline, with a gRPC status);
//! - at the request deadline: 503 `TIMEOUT`. Its deadline is taken when the
//!   request is handed to the layers, before tonic takes its own for the
//!   same time, and tonic polls the request before its timer, so whenever
//!   tonic's timer has fired this layer has answered;
//! - shed by a limit below: 503 `OVERLOADED`, with `Retry-After`.
//!
//! A gRPC call passes through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;

use super::admission::{is_grpc, json_answer};

/// The header in which a gRPC client sets its call's deadline.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The gRPC services a listener serves, by their paths.
#[derive(Debug, Clone, Default)]
pub struct GrpcServices {
    /// `/{service}/` for each.
    prefixes: Arc<[String]>,
}

impl GrpcServices {
    /// `services`: full names, such as `vilvik.keys.v1.KeyVerify`.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            prefixes: services.into_iter().map(|s| format!("/{s}/")).collect(),
        }
    }

    /// Whether a request with `headers` to `path` is a gRPC call: its
    /// content type is gRPC and its path is one of the services'.
    pub fn is_call(&self, headers: &HeaderMap, path: &str) -> bool {
        is_grpc(headers) && self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }
}

/// The tower layer; see the module's documentation.
#[derive(Debug, Clone)]
pub struct HttpAnswerLayer {
    services: GrpcServices,
    /// The request deadline (`request_timeout_ms`).
    timeout: Duration,
}

impl HttpAnswerLayer {
    pub fn new(services: GrpcServices, timeout: Duration) -> Self {
        Self { services, timeout }
    }
}

impl<S> tower::Layer<S> for HttpAnswerLayer {
    type Service = HttpAnswers<S>;

    fn layer(&self, inner: S) -> HttpAnswers<S> {
        HttpAnswers {
            inner,
            services: self.services.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpAnswers<S> {
    inner: S,
    services: GrpcServices,
    timeout: Duration,
}

impl<S> tower::Service<http::Request<Body>> for HttpAnswers<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = HttpAnswerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if self
            .services
            .is_call(request.headers(), request.uri().path())
        {
            return HttpAnswerFuture::Grpc {
                inner: self.inner.call(request),
            };
        }
        // Only a call says it is gRPC below here: admission then reads
        // this one whole and refuses it in HTTP, and a path nothing serves
        // is a 404, never a gRPC status.
        if is_grpc(request.headers()) {
            request.headers_mut().remove(http::header::CONTENT_TYPE);
        }
        if request.headers().contains_key(GRPC_TIMEOUT) {
            return HttpAnswerFuture::Answered {
                answer: Some(json_answer(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "grpc-timeout sets a gRPC call's deadline; this is an HTTP request: send it without the header",
                )),
            };
        }
        // Before tonic takes its own deadline (after this call returns).
        let deadline = Instant::now() + self.timeout;
        HttpAnswerFuture::Http {
            inner: self.inner.call(request),
            deadline,
            timer: None,
            timeout: self.timeout,
        }
    }
}

pin_project_lite::pin_project! {
    #[project = HttpAnswerProj]
    pub enum HttpAnswerFuture<F> {
        Grpc { #[pin] inner: F },
        Http {
            #[pin]
            inner: F,
            deadline: Instant,
            // Made when the answer is not ready at once.
            timer: Option<Pin<Box<Sleep>>>,
            timeout: Duration,
        },
        Answered { answer: Option<http::Response<Body>> },
    }
}

impl<F, E> Future for HttpAnswerFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
    E: Into<tower::BoxError>,
{
    type Output = Result<http::Response<Body>, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HttpAnswerProj::Grpc { inner } => inner.poll(cx).map_err(Into::into),
            HttpAnswerProj::Http {
                inner,
                deadline,
                timer,
                timeout,
            } => {
                if let Poll::Ready(answer) = inner.poll(cx) {
                    return Poll::Ready(Ok(answer.unwrap_or_else(|e| failed(e.into()))));
                }
                // By the clock, not only by the timer: when tonic's timer
                // has fired, this deadline has passed.
                if Instant::now() < *deadline {
                    let timer =
                        timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                    ready!(timer.as_mut().poll(cx));
                }
                Poll::Ready(Ok(json_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TIMEOUT",
                    &format!(
                        "the request did not finish within {} ms (request_timeout_ms): retry shortly",
                        timeout.as_millis()
                    ),
                )))
            }
            HttpAnswerProj::Answered { answer } => {
                Poll::Ready(Ok(answer.take().expect("answered once")))
            }
        }
    }
}

/// The answer to a request a layer below failed: shed, or (never expected)
/// another error, logged.
fn failed(e: tower::BoxError) -> http::Response<Body> {
    if !e.is::<tower::load_shed::error::Overloaded>() {
        tracing::warn!(error = %e, "an HTTP request failed below its route");
        return json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "the request could not be served: retry shortly",
        );
    }
    json_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        "OVERLOADED",
        "too many requests are running on this listener (its concurrency limit, or this connection's share of it): retry shortly, or over another connection",
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const SERVICE: &str = "test.Service";
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn layer() -> HttpAnswerLayer {
        HttpAnswerLayer::new(GrpcServices::new([SERVICE]), TIMEOUT)
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
        let mut request = http::Request::builder().uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::empty()).unwrap()
    }

    async fn json(response: http::Response<Body>) -> (StatusCode, serde_json::Value) {
        let status = response.status();
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn a_grpc_call_is_a_grpc_content_type_on_a_grpc_services_path() {
        let services = GrpcServices::new([SERVICE]);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert!(services.is_call(&headers, "/test.Service/Method"));
        assert!(!services.is_call(&headers, "/v1/authorize"));
        assert!(!services.is_call(&headers, "/test.ServiceX/Method"));
        assert!(!services.is_call(&HeaderMap::new(), "/test.Service/Method"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_request_shed_or_past_its_deadline_gets_a_503_in_json() {
        let shed = tower::service_fn(|_: http::Request<Body>| async {
            Err::<http::Response<Body>, _>(tower::BoxError::from(
                tower::load_shed::error::Overloaded::new(),
            ))
        });
        let answer = layer()
            .layer(shed)
            .oneshot(request(
                "/v1/authorize",
                &[("content-type", "application/grpc")],
            ))
            .await
            .unwrap();
        assert_eq!(answer.headers()["retry-after"], "1");
        let (status, body) = json(answer).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "OVERLOADED");

        let never = tower::service_fn(|_: http::Request<Body>| {
            std::future::pending::<Result<http::Response<Body>, Infallible>>()
        });
        let started = Instant::now();
        let answer = layer()
            .layer(never)
            .oneshot(request("/v1/authorize", &[]))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), TIMEOUT);
        let (status, body) = json(answer).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "TIMEOUT");
        assert!(body["message"].as_str().unwrap().contains("5000 ms"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_request_may_not_set_a_grpc_deadline_and_a_grpc_call_passes_untouched() {
        let mut service = layer().layer(tower::service_fn(|_: http::Request<Body>| async {
            Err::<http::Response<Body>, _>(tower::BoxError::from(
                tower::load_shed::error::Overloaded::new(),
            ))
        }));
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(request("/v1/authorize", &[("grpc-timeout", "1m")]))
            .await
            .unwrap();
        let (status, body) = json(answer).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["message"].as_str().unwrap().contains("grpc-timeout"));
        // A gRPC call's error goes on to tonic, which answers it.
        let call = service
            .ready()
            .await
            .unwrap()
            .call(request(
                "/test.Service/Method",
                &[("content-type", "application/grpc"), ("grpc-timeout", "1m")],
            ))
            .await;
        let err = call.expect_err("passed through");
        assert!(err.is::<tower::load_shed::error::Overloaded>());
    }
}
