//! How both listeners decode requests: prost's codec, except that a request
//! which does not decode is the caller's mistake. tonic answers INTERNAL
//! for it; here it is INVALID_ARGUMENT naming the field, e.g. `name: is
//! not valid UTF-8`.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::service::ApiError;

/// Encodes like [`ProstCodec`]; decodes requests with [`decode_error`].
/// Only servers use it (build.rs), so whatever it decodes came from a caller.
#[derive(Debug, Clone, Default)]
pub struct RequestCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct RequestDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| decode_error(&e).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// What a text field that is not UTF-8 is told, on either listener.
pub const NOT_UTF8: &str = "is not valid UTF-8: send text fields as UTF-8";

/// The field a decode error is about, as a path from the request down
/// (`expires_at.seconds`), and what is wrong with it.
///
/// prost says where only in its message: `failed to decode Protobuf
/// message: Inner.field: Outer.field: description`, innermost first.
pub fn decode_error(e: &prost::DecodeError) -> ApiError {
    let text = e.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut path = Vec::new();
    while let Some((location, after)) = rest.split_once(": ") {
        match location.split_once('.') {
            Some((message, field)) if is_identifier(message) && is_identifier(field) => {
                path.push(field);
                rest = after;
            }
            _ => break,
        }
    }
    path.reverse();
    let field = match path.join(".") {
        path if path.is_empty() => "request".to_owned(),
        path => path,
    };
    if rest.contains("UTF-8") {
        ApiError::invalid(field, NOT_UTF8)
    } else {
        ApiError::invalid(
            field,
            format!("does not decode as the field keys.proto defines ({rest})"),
        )
    }
}

fn is_identifier(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::proto;

    /// A length-delimited field `number` holding `bytes`.
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }

    fn status_of<M: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> Status {
        decode_error(&M::decode(bytes).unwrap_err()).into()
    }

    #[test]
    fn a_string_that_is_not_utf8_names_its_field() {
        let s = status_of::<proto::CreateKeyRequest>(&field(1, b"ci-\xff"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "name: is not valid UTF-8: send text fields as UTF-8"
        );
    }

    #[test]
    fn a_repeated_string_names_its_field() {
        let s = status_of::<proto::CreateKeyRequest>(&field(3, b"\xc3("));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().starts_with("scopes: is not valid UTF-8"),
            "{s:?}"
        );
    }

    #[test]
    fn a_nested_field_is_named_by_its_path() {
        // expires_at (field 4) holding a Timestamp whose seconds (field 1)
        // has the wrong wire type.
        let inner = field(1, b"x");
        let s = status_of::<proto::CreateKeyRequest>(&field(4, &inner));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("expires_at.seconds: does not decode"),
            "{s:?}"
        );
    }

    #[test]
    fn a_truncated_field_names_the_field() {
        // name claims 5 bytes; 1 follows.
        let s = status_of::<proto::CreateKeyRequest>(&[0x0a, 0x05, b'a']);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("name: does not decode as the field keys.proto defines ("),
            "{s:?}"
        );
    }

    #[test]
    fn a_message_broken_outside_any_field_is_about_the_request() {
        // A tag with wire type 7, which does not exist.
        let s = status_of::<proto::CreateKeyRequest>(&[0x0f]);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("request: does not decode"), "{s:?}");
    }
}
