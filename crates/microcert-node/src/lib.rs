#![no_std]
#![forbid(unsafe_code)]
//! The microcert sensor node (work in progress).
