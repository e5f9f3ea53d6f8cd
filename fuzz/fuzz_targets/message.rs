//! `Message::decode` (dispatch on the type nibble) on arbitrary bytes:
//! never panics, whatever it accepts encodes back to exactly the input,
//! and it agrees with `Header::parse` on the header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microcert_core::{Header, Message, Signature};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode(data) {
        let mut out = vec![0u8; data.len()];
        let n = msg.encode(&mut out).expect("a decoded message encodes");
        assert_eq!(&out[..n], data);
        let (ty, header) = Header::parse(data).expect("a decoded message has a header");
        assert_eq!(ty, msg.msg_type());
        assert_eq!(&header, msg.header());
    }
    // The /v1/verify binding: a SIGNATURE followed by its data.
    if let Ok((sig, rest)) = Signature::decode_prefix(data) {
        assert_eq!(sig.len() + rest.len(), data.len());
    }
});
