//! The microcert authentication center as a library.

pub mod card;
mod error;

pub use error::{Error, Result};
