//! The API's one error type, and the one place where every domain error becomes an HTTP
//! status and a `{"error":{"code","message"}}` body.
//!
//! Messages say what to fix. They come from the domain errors, which never carry a
//! secret (keys, tokens, credentials); internal details of unexpected failures are logged
//! and the client gets a generic message.

use hyper::StatusCode;

use crate::auth::AuthError;
use crate::export::ExportError;
use crate::keys::KeysError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable; derived from the status unless a finer one applies.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code_of(status),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    /// An unexpected failure: the detail goes to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        log::error!("internal error: {detail}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the daemon's log has the details",
        )
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

/// The machine-readable code of a status.
fn code_of(status: StatusCode) -> &'static str {
    {
        match status {
            StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
            StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
            StatusCode::FORBIDDEN => "PERMISSION_DENIED",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
            StatusCode::CONFLICT => "ALREADY_EXISTS",
            StatusCode::GONE => "GONE",
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
            StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
            _ => "INTERNAL",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if let StoreError::Full { .. } = e {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; nothing was changed, retry when space is freed"),
            );
        }
        if e.is_unavailable() {
            log::warn!("store unavailable: {e}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key store cannot write right now (disk full or I/O error); nothing was \
                 changed, retry later",
            )
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<KeysError> for ApiError {
    fn from(e: KeysError) -> ApiError {
        let status = match e {
            KeysError::Store(inner) => return inner.into(),
            KeysError::WrongMasterKey(_) | KeysError::Crypto(_) => return ApiError::internal(e),
            KeysError::StreamNotFound(_) | KeysError::KeyNotFound(_) => StatusCode::NOT_FOUND,
            KeysError::StreamExists(_) => StatusCode::CONFLICT,
            KeysError::KeyGone(_) => StatusCode::GONE,
            KeysError::Invalid(_) | KeysError::BadCiphertext(_) | KeysError::NotText(_) => {
                StatusCode::BAD_REQUEST
            }
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Missing | AuthError::Unknown => {
                ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())
            }
            AuthError::MissingScope(_) => ApiError::forbidden(e.to_string()),
            AuthError::Invalid(_) => ApiError::bad_request(e.to_string()),
            AuthError::Exists(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            AuthError::NotFound(_) => ApiError::not_found(e.to_string()),
            AuthError::Protected => ApiError {
                status: StatusCode::CONFLICT,
                code: "FAILED_PRECONDITION",
                message: e.to_string(),
            },
            AuthError::Store(inner) => inner.into(),
            AuthError::InFile(_) => ApiError {
                status: StatusCode::CONFLICT,
                code: "FAILED_PRECONDITION",
                message: e.to_string(),
            },
            AuthError::TokenFile { .. } | AuthError::TokensFile { .. } => ApiError::internal(e),
        }
    }
}

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> ApiError {
        let status = match e {
            ExportError::Keys(inner) => return inner.into(),
            ExportError::Store(inner) => return inner.into(),
            ExportError::Internal(_) => return ApiError::internal(e),
            ExportError::NotAllowed => StatusCode::FORBIDDEN,
            ExportError::Invalid(_) | ExportError::SinkTest(_) => StatusCode::BAD_REQUEST,
            ExportError::NotFound { .. } => StatusCode::NOT_FOUND,
            ExportError::Exists { .. } => StatusCode::CONFLICT,
            ExportError::InUse(_) => {
                return ApiError {
                    status: StatusCode::CONFLICT,
                    code: "FAILED_PRECONDITION",
                    message: e.to_string(),
                };
            }
            ExportError::Sink(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}
