//! `Command::decode` on arbitrary bytes: never panics, and whatever it
//! accepts encodes back to exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microcert_core::Command;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Command::decode(data) {
        let mut out = vec![0u8; data.len()];
        let n = msg.encode(&mut out).expect("a decoded message encodes");
        assert_eq!(&out[..n], data);
        assert_eq!(msg.len(), data.len());
    }
});
