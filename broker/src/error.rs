//! The broker's error type, and where it becomes a protocol code.
//!
//! Library code returns a [`BrokerError`] and does not log it; the edge that
//! handles it (a session answering its client, the admin port) logs it once
//! and maps it to an [`ErrorCode`] with [`BrokerError::code`]. A refusal by a
//! rule carries its own code and a message for the client; a storage error
//! is reported to the client only as "storage error" (the details go to the
//! log, not to the peer).

use courier_protocol::ErrorCode;
use courier_storage::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A rule refused the request (not a member, a limit, a bad argument).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The store failed or holds something unreadable.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    /// The shards have stopped: the node is shutting down.
    #[error("shutting down")]
    Stopped,
}

pub type BrokerResult<T> = Result<T, BrokerError>;

impl BrokerError {
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> BrokerError {
        BrokerError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The protocol code a client is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::Refused { code, .. } => *code,
            BrokerError::Storage(StoreError::NoSpace(_)) => ErrorCode::STORAGE_FULL,
            BrokerError::Storage(StoreError::Unreplicated(_)) => ErrorCode::SHARD_UNAVAILABLE,
            BrokerError::Storage(_) => ErrorCode::INTERNAL,
            BrokerError::Stopped => ErrorCode::SHUTTING_DOWN,
        }
    }

    /// What a client is told (never the store's own words).
    pub fn client_message(&self) -> String {
        match self {
            BrokerError::Refused { message, .. } => message.clone(),
            BrokerError::Storage(StoreError::NoSpace(_)) => "storage full".to_owned(),
            BrokerError::Storage(StoreError::Unreplicated(_)) => {
                courier_protocol::error::with_retry_after(
                    200,
                    "the shard's copies did not confirm the write",
                )
            }
            BrokerError::Storage(_) => "storage error".to_owned(),
            BrokerError::Stopped => "server shutting down".to_owned(),
        }
    }
}

/// `Err(BrokerError::Refused)` with `code` and `message`.
pub fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> BrokerResult<T> {
    Err(BrokerError::refused(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_details_stay_in_the_log() {
        let e = BrokerError::from(StoreError::Io("disk on fire".into()));
        assert_eq!(e.code(), ErrorCode::INTERNAL);
        assert_eq!(e.client_message(), "storage error");
        assert!(e.to_string().contains("disk on fire"), "{e}");
        let r = BrokerError::refused(ErrorCode::GROUP_FULL, "9 members; at most 8");
        assert_eq!(
            (r.code(), r.client_message().as_str()),
            (ErrorCode::GROUP_FULL, "9 members; at most 8")
        );
        assert_eq!(BrokerError::Stopped.code(), ErrorCode::SHUTTING_DOWN);
    }
}
