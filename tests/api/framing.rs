//! Requests whose gRPC framing is wrong (the 5-byte prefix of a message:
//! its compressed flag and its length) are the caller's mistake:
//! INVALID_ARGUMENT naming the problem, on both listeners, before any
//! handler or authentication runs. The generated clients cannot frame a
//! message wrongly, so these requests are written by a raw HTTP/2 client.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpStream;

use vilvik_keys_test_support::{Backend, spawn_app};

const VERIFY: &str = "/vilvik.keys.v1.KeyVerify/VerifyKey";
const ADMIN: &str = "/vilvik.keys.v1.KeyAdmin/GetAccount";
/// Reflection's request is a stream (bidi): only its first message is
/// waited for, and its framing checked the same way.
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// The `grpc-status` and `grpc-message` the server answered a request to
/// `path` with `extra` headers and exactly `body` as its DATA.
async fn raw_request(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> (String, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let (response, mut send) = client
        .ready()
        .await
        .unwrap()
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    send.send_data(Bytes::copy_from_slice(body), true).unwrap();
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    let status_of = |headers: &http::HeaderMap| {
        let read = |name| {
            headers
                .get(name)
                .map(|v| percent_decode(v.to_str().unwrap()))
        };
        read("grpc-status").map(|status| (status, read("grpc-message").unwrap_or_default()))
    };
    if let Some(answer) = status_of(&parts.headers) {
        return answer;
    }
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status_of(&trailers).expect("a grpc-status")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A message of `len` declared bytes, `flag` as its compressed flag, and
/// `payload` as what follows the prefix.
fn framed(flag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const INVALID_ARGUMENT: &str = "3";

/// What is wrong, the request's extra headers, its body, and what the
/// answer's message must say.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    Vec<u8>,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badly_framed_messages_are_invalid_arguments_naming_the_problem() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    // `key: "abc"` (field 1, 3 bytes).
    let message = [0x0a, 3, b'a', b'b', b'c'];
    let cases: [Case; 5] = [
        (
            "compressed flag without grpc-encoding",
            &[],
            framed(1, 5, &message),
            "marked compressed but the request has no grpc-encoding header",
        ),
        (
            "compressed flag with grpc-encoding identity",
            &[("grpc-encoding", "identity")],
            framed(1, 5, &message),
            "marked compressed but the request has no grpc-encoding header",
        ),
        (
            "a compressed flag that is neither 0 nor 1",
            &[],
            framed(7, 5, &message),
            "compressed flag is 7",
        ),
        (
            "a length longer than the data",
            &[],
            framed(0, 100, &message),
            "declares 100 bytes but the request ended after 5",
        ),
        (
            "a prefix cut short",
            &[],
            vec![0, 0],
            "ended inside a message's 5-byte prefix (2 bytes of it sent)",
        ),
    ];
    for (addr, path) in [
        (app.verify_addr, VERIFY),
        (app.admin_addr, ADMIN),
        (app.verify_addr, REFLECTION),
        (app.admin_addr, REFLECTION),
    ] {
        for (what, headers, body, expected) in &cases {
            let (status, message) = raw_request(addr, path, headers, body).await;
            assert_eq!(status, INVALID_ARGUMENT, "{path}, {what}: {message}");
            assert!(
                message.contains(expected),
                "{path}, {what}: '{message}' does not say '{expected}'"
            );
        }
    }
    // A unary call with no message at all.
    for (addr, path) in [(app.verify_addr, VERIFY), (app.admin_addr, ADMIN)] {
        let (status, message) = raw_request(addr, path, &[], &[]).await;
        assert_eq!(status, INVALID_ARGUMENT, "{path}, no message: {message}");
        assert!(message.contains("no message"), "{path}: {message}");
    }
    // Well framed, the same bytes are answered as usual.
    let (status, _) = raw_request(app.verify_addr, VERIFY, &[], &framed(0, 5, &message)).await;
    assert_eq!(status, "0");
}

/// Reflection is a bidirectional stream: a client sends a request and
/// waits for the answer before it sends more or closes. Its first message
/// admits it, so it is answered while the client's side is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflection_stream_is_answered_before_the_client_closes_it() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    for (addr, service) in [
        (app.verify_addr, "vilvik.keys.v1.KeyVerify"),
        (app.admin_addr, "vilvik.keys.v1.KeyAdmin"),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{REFLECTION}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut send) = client
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        // `list_services: ""` (field 7), and the stream left open.
        send.send_data(Bytes::from(framed(0, 2, &[0x3a, 0])), false)
            .unwrap();
        let response = tokio::time::timeout(std::time::Duration::from_secs(5), response)
            .await
            .expect("answered while the stream is open")
            .unwrap();
        let mut body = response.into_body();
        let data = tokio::time::timeout(std::time::Duration::from_secs(5), body.data())
            .await
            .expect("a message while the stream is open")
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains(service), "{text}");
        drop(send);
    }
}
