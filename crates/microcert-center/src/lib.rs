//! The microcert authentication center (work in progress).
