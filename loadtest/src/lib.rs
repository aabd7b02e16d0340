//! The load generator library (placeholder: see `main.rs`).
#![forbid(unsafe_code)]
