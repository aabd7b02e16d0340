//! The trainer library (placeholder: see `main.rs`).
#![forbid(unsafe_code)]
