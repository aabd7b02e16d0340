//! The crate's error type. Every variant says what is wrong with which file part, so that
//! `rankd-tool validate` and the daemon's reload log can print it as is.

/// Everything that can be wrong with a model file, or go wrong reading or writing one.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than its header says, or than a header.
    #[error("truncated model file: {0}")]
    Truncated(String),
    /// The first eight bytes are not the rankd magic.
    #[error("not a rankd model file (starts with \"{}\", expected \"RANKDMDL\")", .0.escape_ascii())]
    BadMagic([u8; 8]),
    /// A format version this build does not read.
    #[error("unsupported model format version {found}; this build reads versions 1..={supported}")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The header or body checksum does not match.
    #[error("checksum mismatch in the {part}: stored {stored:#018x}, computed {computed:#018x} (the file is corrupt)")]
    Checksum {
        /// "header" or "body".
        part: &'static str,
        /// Stored value.
        stored: u64,
        /// Computed value.
        computed: u64,
    },
    /// A header field is out of range.
    #[error("bad header: {0}")]
    Header(String),
    /// The FlatBuffers verifier rejected the metadata section.
    #[error("metadata section is not a valid model FlatBuffer: {0}")]
    Flatbuffer(#[from] flatbuffers::InvalidFlatbuffer),
    /// The feature spec does not compile.
    #[error(transparent)]
    FeatureSpec(#[from] rankd_feature_ops::Error),
    /// A model config (TOML) or a set of tensors does not fit together.
    #[error("model config: {0}")]
    Config(String),
    /// The model breaks one of the format's invariants (shapes, names, blob placement).
    #[error("invalid model: {0}")]
    Invalid(String),
}

impl FormatError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Shorthand.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
