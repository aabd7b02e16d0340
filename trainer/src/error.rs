//! The trainer's error type.

/// What can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A data file is unreadable or malformed.
    #[error("data: {0}")]
    Data(String),
    /// The model file could not be written, or the model config is inconsistent.
    #[error(transparent)]
    Format(#[from] rankd_formats::FormatError),
    /// A training device (GPU) failed.
    #[error("device: {0}")]
    Device(String),
    /// A row's features do not fit the spec.
    #[error("data: {0}")]
    Feature(#[from] rankd_feature_ops::Error),
}

/// Shorthand.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
