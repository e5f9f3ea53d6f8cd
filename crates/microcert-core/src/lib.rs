#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod csk;
pub mod drbg;
mod error;
pub mod fs;
pub mod kdf;
pub mod lifecycle;
pub mod msg;
pub mod ops;
mod secret;
pub mod time;
pub mod wire;

pub use drbg::{Drbg, DrbgError, EntropySource};
pub use error::{Error, Result};
pub use kdf::{Purpose, aes_cmac, derive_key, kdf_ctr_cmac, transport_key};
pub use lifecycle::{Event, KeyState, transition};
pub use msg::{
    Auth, AuthResponse, CHALLENGE_LEN, Codec, Command, ENROLL_PLAINTEXT_LEN, Enroll, EnrollFs,
    FS_PUBLIC_LEN, MAX_SEALED_PLAINTEXT, Message, Opcode, Receipt, Sealed, Sender, Signature,
};
pub use ops::{
    DataDigest, EnrollKey, challenge_window, check_challenge, make_auth, make_auth_response,
    make_challenge, make_command, make_command_fs, make_enroll, make_enroll_fs, make_receipt,
    make_signature, open_enroll, open_enroll_fs, open_in_place, seal, seal_in_place, verify_auth,
    verify_auth_response, verify_command, verify_enroll_fs, verify_receipt, verify_signature,
    working_key,
};
pub use secret::{Key128, KeySeed, SEED_LEN, SEED_ROWS, SEED_YEARS};
pub use wire::{Audience, DeviceId, HEADER_LEN, Header, MsgType, Suite};
