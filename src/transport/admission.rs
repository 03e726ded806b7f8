//! Admission: a request takes a slot of its listener's concurrency only
//! once its message has arrived, so that clients which open streams and
//! never send (or send slowly) cannot hold the slots other clients need.
//!
//! [`AdmissionLayer`] sits between the connection's share (`connections`)
//! and the routes, in place of a plain concurrency limit. For each request
//! it first reads the body:
//!
//! - a request whose body is one message (a unary or server-streaming gRPC
//!   call) or is not gRPC waits for the end of its body; a gRPC request on
//!   a path whose request is a stream (reflection, a client-streaming RPC)
//!   waits for its first complete message, and the rest passes through;
//! - it waits at most `message_timeout` (then CANCELLED), and the bytes it
//!   holds beyond [`FREE_BYTES`] come from the listener's `budget_bytes`,
//!   shared by every request still arriving (spent: RESOURCE_EXHAUSTED);
//! - it checks the gRPC framing as it goes (each message's 5-byte prefix:
//!   the compressed flag, the declared length against the limit and
//!   against what arrived): a badly framed request is INVALID_ARGUMENT
//!   naming the problem, a message over the limit OUT_OF_RANGE.
//!
//! Only then does it take a slot (none free: RESOURCE_EXHAUSTED at once,
//! nothing queues) and hand the request, its body replayed, to the routes;
//! the slot is held until the response's headers are ready. None of this
//! knows a service: the paths whose request is a stream are given.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use smallvec::SmallVec;
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

/// Bytes a request may hold while it arrives without drawing on the
/// listener's budget: about what its headers cost anyway, and more than a
/// usual request (a verify is under 100 bytes).
pub const FREE_BYTES: usize = 1024;

/// The gRPC message prefix: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

/// How one listener admits requests.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Requests running at once (holding a slot).
    pub concurrency: usize,
    /// How long a request's message may take to arrive after its headers.
    pub message_timeout: Duration,
    /// Bytes of requests still arriving a listener holds at once, beyond
    /// each one's [`FREE_BYTES`].
    pub budget_bytes: usize,
    /// The largest request message (and non-gRPC request body).
    pub max_message_bytes: usize,
    /// Paths (`/package.Service/Method`) whose request is a stream of
    /// messages rather than one.
    pub streaming_paths: Vec<String>,
}

/// The tower layer; see the module's documentation.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Requests holding a slot now (at most `settings.concurrency`): a
    /// counter, as nothing waits for a slot.
    running: AtomicUsize,
    /// Bytes drawn from the budget now.
    held: AtomicUsize,
    settings: AdmissionSettings,
}

impl AdmissionLayer {
    pub fn new(settings: AdmissionSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                running: AtomicUsize::new(0),
                held: AtomicUsize::new(0),
                settings,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<http::Request<Body>> for Admission<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone,
    S::Error: Into<tower::BoxError>,
{
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = AdmissionFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (parts, mut body) = request.into_parts();
        // The answer layer outside has taken the gRPC content type off any
        // request that is not a call: the content type says it all here.
        let grpc = is_grpc(&parts.headers);
        let mode = if !grpc {
            Mode::Whole
        } else if self.shared.is_streaming(parts.uri.path()) {
            Mode::FirstMessage
        } else {
            Mode::OneMessage
        };
        let mut first = None;
        if mode == Mode::OneMessage {
            // The usual call: one small message, whole in the DATA frame
            // that ended the stream. Admitted here, with nothing built to
            // wait with; anything else goes the general way below, with
            // what was read.
            if let Poll::Ready(polled) =
                Pin::new(&mut body).poll_frame(&mut Context::from_waker(Waker::noop()))
            {
                match polled {
                    Some(Ok(frame))
                        if body.is_end_stream()
                            && frame.data_ref().is_some_and(|d| is_one_small_message(d)) =>
                    {
                        let data = frame.into_data().expect("a data frame");
                        let request =
                            http::Request::from_parts(parts, Body::new(Whole(Some(data))));
                        return AdmissionFuture {
                            state: run(&self.shared, &mut self.inner, request),
                        };
                    }
                    polled => first = Some(polled),
                }
            }
        }
        let mut arriving = Arriving {
            parts: Some(parts),
            body: Some(body),
            first,
            chunks: SmallVec::new(),
            trailers: None,
            frames: Frames::default(),
            mode,
            held: 0,
            drawn: 0,
            deadline: None,
            inner: None,
            shared: self.shared.clone(),
        };
        // A usual call's message came with its headers: read it now and
        // admit the call here, without a state of its own to keep. Polled
        // again with the task's waker if it has not all arrived.
        let state = match arriving.poll_arrive(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(admitted) => arriving.admit(admitted, &mut self.inner),
            Poll::Pending => {
                // The service made ready goes with the request; a clone stays.
                let inner = self.inner.clone();
                arriving.inner = Some(std::mem::replace(&mut self.inner, inner));
                State::Arriving {
                    arriving: Box::new(arriving),
                }
            }
        };
        AdmissionFuture { state }
    }
}

impl Shared {
    fn is_streaming(&self, path: &str) -> bool {
        self.settings.streaming_paths.iter().any(|p| p == path)
    }
}

/// An admitted request handed to `inner` with a slot, or shed at once when
/// none is free (tonic answers it RESOURCE_EXHAUSTED, as for the
/// connection's share).
fn run<S: tower::Service<http::Request<Body>>>(
    shared: &Arc<Shared>,
    inner: &mut S,
    request: http::Request<Body>,
) -> State<S> {
    match Slot::take(shared) {
        Some(slot) => State::Running {
            future: inner.call(request),
            slot,
        },
        None => State::Answered {
            answer: Some(Err(Box::new(tower::load_shed::error::Overloaded::new()))),
        },
    }
}

/// Whether `data` is exactly one uncompressed message, within
/// [`FREE_BYTES`] (so it needs nothing of the budget and is under any
/// message limit).
fn is_one_small_message(data: &[u8]) -> bool {
    data.len() <= FREE_BYTES
        && data.len() >= PREFIX
        && data[0] == 0
        && declared_len(data) == data.len() - PREFIX
}

/// The message length a gRPC prefix (a flag, then 4 bytes big-endian)
/// declares.
fn declared_len(prefix: &[u8]) -> usize {
    u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize
}

/// Whether a request's content type is gRPC. Below
/// [`super::http_answers`], only a call's is: that layer takes it off any
/// other request.
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"))
}

/// What a request waits for before it is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A gRPC call whose request is one message (unary, or
    /// server-streaming): that message, then the end of the body.
    OneMessage,
    /// A gRPC call whose request is a stream: its first message.
    FirstMessage,
    /// Not gRPC: the whole body.
    Whole,
}

pin_project_lite::pin_project! {
    pub struct AdmissionFuture<S: tower::Service<http::Request<Body>>> {
        #[pin]
        state: State<S>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S: tower::Service<http::Request<Body>>> {
        Arriving { arriving: Box<Arriving<S>> },
        Running {
            #[pin]
            future: S::Future,
            // Held until the response's headers are ready.
            slot: Slot,
        },
        /// Refused or shed.
        Answered { answer: Option<Result<http::Response<Body>, tower::BoxError>> },
        Done,
    }
}

/// A request whose body is still arriving.
struct Arriving<S> {
    parts: Option<http::request::Parts>,
    body: Option<Body>,
    /// What `call` already read of the body, to take before reading on.
    first: Option<Option<Result<Frame<Bytes>, Status>>>,
    /// What was read, usually one chunk.
    chunks: SmallVec<[Bytes; 2]>,
    trailers: Option<HeaderMap>,
    frames: Frames,
    mode: Mode,
    /// Bytes in `chunks`.
    held: usize,
    /// Of which drawn from the listener's budget.
    drawn: usize,
    /// Set when the body first has to be waited for.
    deadline: Option<Pin<Box<Sleep>>>,
    inner: Option<S>,
    shared: Arc<Shared>,
}

impl<S> Drop for Arriving<S> {
    fn drop(&mut self) {
        if self.drawn > 0 {
            self.shared.held.fetch_sub(self.drawn, Ordering::AcqRel);
        }
    }
}

/// A slot of the listener's concurrency, held until dropped.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Slot> {
        let limit = shared.settings.concurrency;
        if shared.running.fetch_add(1, Ordering::AcqRel) >= limit {
            shared.running.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(shared.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Framing(FrameError),
    /// Its message did not arrive within the message timeout.
    Late(Duration),
    /// The listener's budget for requests still arriving is spent.
    Budget(usize),
    /// Not gRPC, and longer than the limit.
    TooLarge(usize),
    /// A body error: the client reset the stream or the connection broke.
    Body(String),
}

impl<S> Arriving<S>
where
    S: tower::Service<http::Request<Body>>,
{
    /// Reads the body until the request is admitted (`Ok`) or refused.
    fn poll_arrive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        let max = self.shared.settings.max_message_bytes;
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let polled = match self.first.take() {
                Some(first) => Poll::Ready(first),
                None => Pin::new(body).poll_frame(cx),
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if self.mode == Mode::Whole {
                            if self.held + data.len() > max {
                                return Poll::Ready(Err(Refusal::TooLarge(max)));
                            }
                        } else {
                            let headers = &self.parts.as_ref().expect("parts").headers;
                            self.frames
                                .feed(&data, max, || may_compress(headers))
                                .map_err(Refusal::Framing)?;
                        }
                        self.hold(data)?;
                        if self.mode == Mode::FirstMessage && self.frames.messages > 0 {
                            return Poll::Ready(Ok(()));
                        }
                        if self.mode == Mode::OneMessage
                            && (self.frames.messages > 1
                                || self.frames.messages == 1 && self.frames.within())
                        {
                            return Poll::Ready(Err(Refusal::Framing(FrameError::Second)));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Refusal::Body(e.to_string()))),
                Poll::Ready(None) => {
                    self.body = None;
                    if self.mode != Mode::Whole {
                        self.frames.finish().map_err(Refusal::Framing)?;
                        if self.mode == Mode::OneMessage && self.frames.messages == 0 {
                            return Poll::Ready(Err(Refusal::Framing(FrameError::NoMessage)));
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => {
                    let timeout = self.shared.settings.message_timeout;
                    let deadline = self
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(Err(Refusal::Late(timeout)));
                }
            }
        }
    }

    /// What follows the body's arrival: the call handed to `inner` with a
    /// slot, or the answer to a refused or shed one.
    fn admit(&mut self, admitted: Result<(), Refusal>, inner: &mut S) -> State<S> {
        if let Err(refusal) = admitted {
            let answer = refused(refusal, self.mode != Mode::Whole);
            return State::Answered {
                answer: Some(Ok(answer)),
            };
        }
        let request = self.request();
        run(&self.shared, inner, request)
    }

    /// Keeps `data`, drawing what goes beyond [`FREE_BYTES`] from the
    /// listener's budget.
    fn hold(&mut self, data: Bytes) -> Result<(), Refusal> {
        self.held += data.len();
        let need = self.held.saturating_sub(FREE_BYTES) - self.drawn;
        if need > 0 {
            let budget = self.shared.settings.budget_bytes;
            let before = self.shared.held.fetch_add(need, Ordering::AcqRel);
            if before + need > budget {
                self.shared.held.fetch_sub(need, Ordering::AcqRel);
                return Err(Refusal::Budget(budget));
            }
            self.drawn += need;
        }
        if !data.is_empty() {
            self.chunks.push(data);
        }
        Ok(())
    }

    /// The request as the routes get it: its body replayed from what was
    /// read, then (when it had not ended) the rest, still checked.
    fn request(&mut self) -> http::Request<Body> {
        let parts = self.parts.take().expect("parts");
        if self.body.is_none() && self.trailers.is_none() && self.chunks.len() == 1 {
            // The usual call: one chunk, nothing after it.
            let chunk = self.chunks.pop().expect("one chunk");
            return http::Request::from_parts(parts, Body::new(Whole(Some(chunk))));
        }
        let compressed = self.body.is_some() && may_compress(&parts.headers);
        let body = Replay {
            chunks: std::mem::take(&mut self.chunks).into_iter(),
            trailers: self.trailers.take(),
            rest: self.body.take(),
            frames: std::mem::take(&mut self.frames),
            compressed,
            max: self.shared.settings.max_message_bytes,
        };
        http::Request::from_parts(parts, Body::new(body))
    }
}

impl<S> Future for AdmissionFuture<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    type Output = Result<http::Response<Body>, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Arriving { arriving } => {
                    let admitted = ready!(arriving.poll_arrive(cx));
                    let mut inner = arriving.inner.take().expect("inner");
                    let next = arriving.admit(admitted, &mut inner);
                    state.set(next);
                }
                StateProj::Answered { answer } => {
                    let answer = answer.take().expect("answered once");
                    state.set(State::Done);
                    return Poll::Ready(answer);
                }
                StateProj::Running { future, .. } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into);
                    state.set(State::Done);
                    return Poll::Ready(response);
                }
                StateProj::Done => panic!("polled after completion"),
            }
        }
    }
}

/// The answer to a refused request: a gRPC status, or for a request that
/// is not a gRPC call the HTTP status that says the same, in JSON.
fn refused(refusal: Refusal, grpc: bool) -> http::Response<Body> {
    let status = match &refusal {
        Refusal::Framing(e @ FrameError::TooLong { .. }) => Status::out_of_range(e.to_string()),
        Refusal::Framing(e) => Status::invalid_argument(e.to_string()),
        Refusal::Late(timeout) => Status::cancelled(format!(
            "the request's message did not arrive within {} ms of its headers (request_message_timeout_ms)",
            timeout.as_millis()
        )),
        Refusal::Budget(budget) => Status::resource_exhausted(format!(
            "too many requests are still arriving: their messages fill the listener's {budget} bytes (request_message_budget_bytes); retry shortly"
        )),
        Refusal::TooLarge(max) => Status::out_of_range(format!(
            "the request's body is too large: over the limit of {max} bytes"
        )),
        Refusal::Body(e) => Status::cancelled(format!("the request's body failed: {e}")),
    };
    if grpc {
        return status.into_http();
    }
    let (code, name) = match refusal {
        Refusal::Framing(_) | Refusal::Body(_) => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Refusal::Late(_) => (StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
        Refusal::Budget(_) => (StatusCode::SERVICE_UNAVAILABLE, "RESOURCE_EXHAUSTED"),
        Refusal::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
    };
    json_answer(code, name, status.message())
}

/// An HTTP refusal as the HTTP face writes its own: `{"code":…,"message":…}`,
/// never cached, and a 503 with `Retry-After`.
pub(super) fn json_answer(status: StatusCode, code: &str, message: &str) -> http::Response<Body> {
    let body = serde_json::json!({ "code": code, "message": message });
    let body = format!("{body}\n");
    let mut response = http::Response::new(Body::new(Replay::of(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Whether a message may be marked compressed: the request names an
/// encoding other than identity (whether it is supported is tonic's call).
fn may_compress(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
}

/// A badly framed request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FrameError {
    Flag(u8),
    CompressedWithoutEncoding,
    TooLong { declared: usize, max: usize },
    Truncated { declared: usize, sent: usize },
    CutPrefix { sent: usize },
    NoMessage,
    Second,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Flag(flag) => write!(
                f,
                "the compressed flag is {flag} in a message's prefix: it must be 0 (not compressed) or 1 (compressed with the request's grpc-encoding)"
            ),
            FrameError::CompressedWithoutEncoding => f.write_str(
                "the request's message is marked compressed but the request has no grpc-encoding header: send it with compressed flag 0, or name its encoding",
            ),
            FrameError::TooLong { declared, max } => write!(
                f,
                "the request's message is too large: {declared} bytes, over the limit of {max}"
            ),
            FrameError::Truncated { declared, sent } => write!(
                f,
                "the request's message declares {declared} bytes but the request ended after {sent} of them"
            ),
            FrameError::CutPrefix { sent } => write!(
                f,
                "the request ended inside a message's 5-byte prefix ({sent} bytes of it sent)"
            ),
            FrameError::NoMessage => {
                f.write_str("the request ended with no message: a unary call sends exactly one")
            }
            FrameError::Second => f.write_str(
                "the request has a second message: a unary call sends exactly one",
            ),
        }
    }
}

/// Where a request's bytes are in its gRPC framing.
#[derive(Debug, Default, Clone)]
struct Frames {
    prefix: [u8; PREFIX],
    /// Bytes of the current prefix seen.
    have: usize,
    /// The current message's declared length, once its prefix is complete.
    declared: Option<usize>,
    /// Bytes of the current message still to come.
    left: usize,
    /// Messages complete so far.
    messages: usize,
}

impl Frames {
    /// Follows `data` through the framing; `headers` are the request's.
    fn feed(
        &mut self,
        mut data: &[u8],
        max: usize,
        may_compress: impl Fn() -> bool,
    ) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.declared.is_some() {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                if self.left == 0 {
                    self.messages += 1;
                    self.declared = None;
                    self.have = 0;
                }
                continue;
            }
            let n = (PREFIX - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < PREFIX {
                continue;
            }
            match self.prefix[0] {
                0 => {}
                1 if may_compress() => {}
                1 => return Err(FrameError::CompressedWithoutEncoding),
                flag => return Err(FrameError::Flag(flag)),
            }
            let len = declared_len(&self.prefix);
            if len > max {
                return Err(FrameError::TooLong { declared: len, max });
            }
            if len == 0 {
                self.messages += 1;
                self.have = 0;
            } else {
                self.declared = Some(len);
                self.left = len;
            }
        }
        Ok(())
    }

    /// Whether a message has begun and not ended.
    fn within(&self) -> bool {
        self.have > 0
    }

    /// At the end of the body: whether it ended between messages.
    fn finish(&self) -> Result<(), FrameError> {
        match self.declared {
            Some(declared) => Err(FrameError::Truncated {
                declared,
                sent: declared - self.left,
            }),
            None if self.have > 0 => Err(FrameError::CutPrefix { sent: self.have }),
            None => Ok(()),
        }
    }
}

/// A body that is one chunk.
struct Whole(Option<Bytes>);

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.take().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |c| c.len() as u64))
    }
}

/// A request's body as the routes read it: the chunks read before it was
/// admitted, then its trailers or the rest of it, whose framing is still
/// checked (a framing error is the body's error: INVALID_ARGUMENT).
struct Replay {
    chunks: smallvec::IntoIter<[Bytes; 2]>,
    trailers: Option<HeaderMap>,
    rest: Option<Body>,
    frames: Frames,
    /// The request names an encoding (only read with `rest`).
    compressed: bool,
    max: usize,
}

impl Replay {
    /// A whole body of `bytes`.
    fn of(bytes: Bytes) -> Self {
        let mut chunks = SmallVec::new();
        chunks.push(bytes);
        Self {
            chunks: chunks.into_iter(),
            trailers: None,
            rest: None,
            frames: Frames::default(),
            compressed: false,
            max: 0,
        }
    }
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(chunk) = this.chunks.next() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(rest).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let compressed = this.compressed;
                    if let Err(e) = this.frames.feed(data, this.max, || compressed) {
                        this.rest = None;
                        return Poll::Ready(Some(Err(match e {
                            FrameError::TooLong { .. } => Status::out_of_range(e.to_string()),
                            e => Status::invalid_argument(e.to_string()),
                        })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            None => {
                this.rest = None;
                match this.frames.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(Status::invalid_argument(e.to_string())))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.len() == 0 && self.trailers.is_none() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: usize = self.chunks.as_slice().iter().map(Bytes::len).sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered as u64),
            Some(rest) => {
                let mut hint = rest.size_hint();
                hint.set_lower(hint.lower() + buffered as u64);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + buffered as u64);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use http_body_util::channel::{Channel, Sender};
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);
    const STREAMING: &str = "/test.Service/Stream";

    fn layer(concurrency: usize, budget_bytes: usize) -> AdmissionLayer {
        AdmissionLayer::new(AdmissionSettings {
            concurrency,
            message_timeout: TIMEOUT,
            budget_bytes,
            max_message_bytes: 64 * 1024,
            streaming_paths: vec![STREAMING.to_owned()],
        })
    }

    /// Routes that read the whole body (as tonic does) and answer OK, or
    /// wait for `release` first.
    fn routes(
        release: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> impl tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |request: http::Request<Body>| {
            let release = release.clone();
            async move {
                if let Some(mut release) = release {
                    let _ = release.wait_for(|go| *go).await;
                }
                let body = request.into_body().collect().await;
                let status = match body {
                    Ok(_) => Status::ok(""),
                    Err(status) => status,
                };
                Ok::<_, Infallible>(status.into_http())
            }
        })
    }

    fn request(path: &str, body: Body) -> http::Request<Body> {
        http::Request::builder()
            .uri(path)
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    }

    /// A body whose bytes the test sends as it likes.
    fn open_body() -> (Sender<Bytes, Status>, Body) {
        let (sender, body) = Channel::<Bytes, Status>::new(4);
        (sender, Body::new(body))
    }

    fn message(len: usize) -> Bytes {
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        out.resize(PREFIX + len, b'x');
        Bytes::from(out)
    }

    fn code(answer: &Result<http::Response<Body>, tower::BoxError>) -> String {
        match answer {
            Ok(response) => response.headers()["grpc-status"]
                .to_str()
                .unwrap()
                .to_owned(),
            Err(e) if e.is::<tower::load_shed::error::Overloaded>() => "overloaded".to_owned(),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_message_has_not_arrived_holds_no_slot_and_is_cancelled_in_time() {
        let mut service = layer(1, 1 << 20).layer(routes(None));
        let (mut stalled_sender, stalled_body) = open_body();
        stalled_sender
            .send_data(message(10).slice(..3))
            .await
            .unwrap();
        let stalled = service
            .ready()
            .await
            .unwrap()
            .call(request("/test.Service/Unary", stalled_body));
        let stalled = tokio::spawn(stalled);
        tokio::task::yield_now().await;
        // The only slot is free for a request whose message is whole.
        for _ in 0..3 {
            let answer = service
                .ready()
                .await
                .unwrap()
                .call(request(
                    "/test.Service/Unary",
                    Body::new(Replay::of(message(10))),
                ))
                .await;
            assert_eq!(code(&answer), "0");
        }
        let started = tokio::time::Instant::now();
        let answer = stalled.await.unwrap();
        assert_eq!(code(&answer), "1", "CANCELLED");
        assert_eq!(started.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_taken_once_the_message_is_whole_and_none_free_sheds_at_once() {
        let (release, released) = tokio::sync::watch::channel(false);
        let mut service = layer(1, 1 << 20).layer(routes(Some(released)));
        let running = service.ready().await.unwrap().call(request(
            "/test.Service/Unary",
            Body::new(Replay::of(message(10))),
        ));
        let running = tokio::spawn(running);
        tokio::task::yield_now().await;
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(request(
                "/test.Service/Unary",
                Body::new(Replay::of(message(10))),
            ))
            .await;
        assert_eq!(code(&answer), "overloaded");
        release.send(true).unwrap();
        assert_eq!(code(&running.await.unwrap()), "0");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_of_requests_still_arriving_draw_on_one_budget_released_when_they_go() {
        let budget = 64 * 1024;
        let mut service = layer(8, budget).layer(routes(None));
        // 40 KiB of a 60 KiB message: about 39 KiB drawn.
        let (mut first_sender, first_body) = open_body();
        first_sender
            .send_data(message(60_000).slice(..40_000))
            .await
            .unwrap();
        let first = tokio::spawn(
            service
                .ready()
                .await
                .unwrap()
                .call(request("/test.Service/Unary", first_body)),
        );
        tokio::task::yield_now().await;
        assert_eq!(
            service.shared.held.load(Ordering::Acquire),
            40_000 - FREE_BYTES
        );
        // Another 30 KiB does not fit in what is left.
        let (mut second_sender, second_body) = open_body();
        second_sender
            .send_data(message(60_000).slice(..30_000))
            .await
            .unwrap();
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(request("/test.Service/Unary", second_body))
            .await;
        assert_eq!(code(&answer), "8", "RESOURCE_EXHAUSTED");
        // A small request needs none of it.
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(request(
                "/test.Service/Unary",
                Body::new(Replay::of(message(100))),
            ))
            .await;
        assert_eq!(code(&answer), "0");
        // The first one completes; what it drew goes back.
        first_sender
            .send_data(message(60_000).slice(40_000..))
            .await
            .unwrap();
        drop(first_sender);
        assert_eq!(code(&first.await.unwrap()), "0");
        assert_eq!(service.shared.held.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_request_is_admitted_at_its_first_message_and_the_rest_is_still_checked() {
        let mut service = layer(1, 1 << 20).layer(routes(None));
        let (mut sender, body) = open_body();
        sender.send_data(message(10)).await.unwrap();
        let call = tokio::spawn(
            service
                .ready()
                .await
                .unwrap()
                .call(request(STREAMING, body)),
        );
        // Admitted (the routes read on) long before the message timeout.
        tokio::time::sleep(TIMEOUT * 2).await;
        sender.send_data(message(10)).await.unwrap();
        // A second message with a bad flag: the routes read the error.
        sender
            .send_data(Bytes::from_static(&[9, 0, 0, 0, 1, 0]))
            .await
            .unwrap();
        let answer = call.await.unwrap().unwrap();
        assert_eq!(answer.headers()["grpc-status"], "3");
    }

    #[test]
    fn only_one_small_uncompressed_message_takes_the_quick_way() {
        assert!(is_one_small_message(&message(10)));
        assert!(is_one_small_message(&message(0)));
        assert!(is_one_small_message(&message(FREE_BYTES - PREFIX)));
        assert!(
            !is_one_small_message(&message(FREE_BYTES)),
            "over FREE_BYTES"
        );
        let mut compressed = message(10).to_vec();
        compressed[0] = 1;
        assert!(!is_one_small_message(&compressed), "compressed");
        assert!(!is_one_small_message(&message(10)[..14]), "cut short");
        let two = [&message(3)[..], &message(3)[..]].concat();
        assert!(!is_one_small_message(&two), "two messages");
        assert!(!is_one_small_message(&[0, 0, 0]), "a prefix cut short");
    }

    #[test]
    fn the_framing_is_followed_across_chunks() {
        let mut frames = Frames::default();
        let whole = [message(3), message(0), message(2)].concat();
        for byte in whole.chunks(1) {
            frames.feed(byte, 10, || false).unwrap();
        }
        assert_eq!(frames.messages, 3);
        assert_eq!(frames.finish(), Ok(()));
        let mut cut = Frames::default();
        cut.feed(&message(8)[..7], 10, || false).unwrap();
        assert_eq!(
            cut.finish(),
            Err(FrameError::Truncated {
                declared: 8,
                sent: 2
            })
        );
        assert_eq!(
            Frames::default().feed(&message(11), 10, || false),
            Err(FrameError::TooLong {
                declared: 11,
                max: 10
            })
        );
        let compressed = [1, 0, 0, 0, 1, 0];
        assert_eq!(
            Frames::default().feed(&compressed, 10, || false),
            Err(FrameError::CompressedWithoutEncoding)
        );
        assert_eq!(Frames::default().feed(&compressed, 10, || true), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_is_not_grpc_is_read_whole_and_refused_in_json() {
        let mut service = layer(1, 1 << 20).layer(routes(None));
        // Over the limit: 413 in JSON, not OUT_OF_RANGE as a gRPC status.
        let big = Bytes::from(vec![b'x'; 64 * 1024 + 1]);
        let mut request = http::Request::builder()
            .uri("/v1/keys:verify")
            .body(Body::new(Replay::of(big)))
            .unwrap();
        request
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        let answer = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answer.headers()["content-type"], "application/json");
        assert!(answer.headers().get("grpc-status").is_none());
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");
        assert_eq!(
            body["message"],
            "the request's body is too large: over the limit of 65536 bytes"
        );
    }
}
