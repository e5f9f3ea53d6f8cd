#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod card;
pub mod clone;
mod config;
mod error;
mod import;
mod keys;
mod pool;

pub use card::Pkcs11Card;
pub use config::{PIN_ENV, Pkcs11Config, SOFTHSM2_MODULE};
pub use error::{Pkcs11Error, Result};
pub use keys::{KCHAL_LABEL, KINT_LABEL, KSTORE_PREFIX, KTRANS_LABEL, KeyPolicy, kstore_label};
