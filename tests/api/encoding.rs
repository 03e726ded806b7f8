//! Requests whose bytes do not decode as the proto says (here: strings that
//! are not UTF-8) are the caller's mistake: INVALID_ARGUMENT naming the
//! field, on both listeners, and nothing changes. The generated clients
//! cannot send such bytes, so these calls go through a codec that sends
//! the message exactly as written.

use std::net::SocketAddr;

use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Request, Status};

use vilvik_keys_test_support::{Backend, TestApp, bearer, channel, spawn_app, without_usage};

crate::on_both_backends!(strings_that_are_not_utf8_are_invalid_arguments_naming_the_field);

/// Sends and receives message bodies as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self {
        *self
    }
    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

async fn raw_call(
    addr: SocketAddr,
    method: &'static str,
    body: Vec<u8>,
    credential: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.unwrap();
    let request = match credential {
        Some(credential) => bearer(body, credential),
        None => Request::new(body),
    };
    let path = http::uri::PathAndQuery::from_static(method);
    grpc.unary(request, path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A length-delimited field `number` holding `bytes`.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2, u8::try_from(bytes.len()).unwrap()];
    out.extend_from_slice(bytes);
    out
}

const NOT_UTF8: &[u8] = b"bad-\xff\xfe";

async fn strings_that_are_not_utf8_are_invalid_arguments_naming_the_field(mut app: TestApp) {
    app.create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let keys_before = without_usage(app.list_keys(true).await);
    let audit_before = app.audit("").await;

    let admin_cases: [(&'static str, u8, &str); 11] = [
        ("/vilvik.keys.v1.KeyAdmin/CreateKey", 1, "name"),
        ("/vilvik.keys.v1.KeyAdmin/CreateKey", 2, "description"),
        ("/vilvik.keys.v1.KeyAdmin/CreateKey", 3, "scopes"),
        ("/vilvik.keys.v1.KeyAdmin/ListKeys", 2, "page_token"),
        ("/vilvik.keys.v1.KeyAdmin/GetKey", 1, "key_id"),
        ("/vilvik.keys.v1.KeyAdmin/UpdateKey", 2, "name"),
        ("/vilvik.keys.v1.KeyAdmin/RotateKey", 1, "key_id"),
        ("/vilvik.keys.v1.KeyAdmin/RevokeKey", 2, "reason"),
        ("/vilvik.keys.v1.KeyAdmin/ListAuditEvents", 3, "page_token"),
        ("/vilvik.keys.v1.KeyAdmin/SetAccountTier", 1, "account_id"),
        ("/vilvik.keys.v1.KeyAdmin/UpdateKey", 4, "scopes"),
    ];
    for (method, number, name) in admin_cases {
        let outcome = raw_call(
            app.admin_addr,
            method,
            field(number, NOT_UTF8),
            Some(&app.management_key),
        )
        .await;
        let status = outcome.expect_err(method);
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert_eq!(
            status.message(),
            format!("{name}: is not valid UTF-8: send text fields as UTF-8"),
            "{method}"
        );
    }

    let verify = "/vilvik.keys.v1.KeyVerify/VerifyKey";
    for (number, name) in [(1, "key"), (2, "required_scopes"), (3, "client_ip")] {
        let outcome = raw_call(app.verify_addr, verify, field(number, NOT_UTF8), None).await;
        let status = outcome.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(
            status.message(),
            format!("{name}: is not valid UTF-8: send text fields as UTF-8")
        );
    }

    assert_eq!(without_usage(app.list_keys(true).await), keys_before);
    assert_eq!(app.audit("").await, audit_before);
}

/// Every RPC the proto declares answers on its listener (an empty request
/// gets some status, never UNIMPLEMENTED): a method added to the proto
/// without a server behind it fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_the_proto_is_served() {
    use prost::Message;
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let set =
        prost_types::FileDescriptorSet::decode(vilvik_keys::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut services = Vec::new();
    for service in set.file.iter().flat_map(|f| &f.service) {
        let addr = match service.name() {
            "KeyAdmin" => app.admin_addr,
            "KeyVerify" => app.verify_addr,
            other => panic!("the proto declares service {other}: which listener serves it?"),
        };
        for method in &service.method {
            let path: &'static str =
                format!("/vilvik.keys.v1.{}/{}", service.name(), method.name()).leak();
            let outcome = raw_call(addr, path, Vec::new(), Some(&app.management_key)).await;
            if let Err(status) = outcome {
                assert_ne!(status.code(), Code::Unimplemented, "{path}: {status:?}");
            }
        }
        services.push(service.name());
    }
    services.sort_unstable();
    assert_eq!(services, ["KeyAdmin", "KeyVerify"]);
}
