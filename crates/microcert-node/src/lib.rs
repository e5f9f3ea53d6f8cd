#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![doc = include_str!("../README.md")]

mod chip;
mod error;
mod exchanges;
mod image;
mod node;
mod scrub;
mod seedgen;
mod soft;
mod storage;

pub use chip::{Answered, Entropy, EntropyFailure, Life, Personalization, SecureChip, Status};
pub use error::{Error, Result};
pub use image::{IMAGE_LEN, IMAGE_MAGIC, IMAGE_VERSION};
pub use node::Node;
pub use seedgen::SEED_INPUT_LEN;
pub use soft::SoftChip;
pub use storage::{
    CLASS1_MAX_SEALED, ChipStorage, MAX_AUDIENCES, NoEntropy, NodeRecord, SoftStorage,
};
