//! The microcert authentication center as a library.

pub mod audit;
pub mod card;
pub mod db;
mod error;
pub mod integrity;

pub use error::{Error, Result};
