//! Stable numeric error codes carried by `Error`, `Goodbye` and per-item batch results.

use std::fmt;

/// A stable error code. Codes are a wire contract: a number, once given a
/// meaning, keeps it. Unknown codes from a newer peer decode fine and print
/// as `unknown`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $value:expr, $text:expr; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode($value); )*

            /// Every code this version defines, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's symbolic name, as in the protocol document.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $( $value => stringify!($name), )*
                    _ => "UNKNOWN",
                }
            }

            /// A one-line description for logs and error messages.
            pub fn description(self) -> &'static str {
                match self.0 {
                    $( $value => $text, )*
                    _ => "unknown error code",
                }
            }
        }
    };
}

codes! {
    /// Success (only inside per-item batch results).
    OK = 0, "ok";
    /// The frame could not be parsed; the stream is closed.
    MALFORMED_FRAME = 1, "malformed frame";
    /// The frame's length exceeds the negotiated maximum; the stream is closed.
    FRAME_TOO_LARGE = 2, "frame too large";
    /// The client's protocol version is not supported; the stream is closed.
    UNSUPPORTED_VERSION = 3, "unsupported protocol version";
    /// The frame type is not known to this server; the stream is closed.
    UNKNOWN_FRAME_TYPE = 4, "unknown frame type";
    /// A frame arrived that is not valid in the session's state (e.g. Send before Hello).
    UNEXPECTED_FRAME = 5, "frame not valid in this state";
    /// No Hello arrived within the handshake timeout.
    HANDSHAKE_TIMEOUT = 6, "handshake timeout";
    /// The token does not verify, or names another user or device.
    AUTH_FAILED = 10, "authentication failed";
    /// The token has expired.
    TOKEN_EXPIRED = 11, "token expired";
    /// The session may not access the named resource (e.g. another user's inbox).
    FORBIDDEN = 12, "forbidden";
    /// The destination kind is not served by this server version.
    DESTINATION_UNSUPPORTED = 20, "destination kind not supported";
    /// The destination does not exist or is invalid (e.g. user id 0).
    INVALID_DESTINATION = 21, "invalid destination";
    /// A batch carries more items than the server allows (or none).
    BATCH_TOO_LARGE = 22, "batch too large";
    /// The payload exceeds the server's payload limit.
    PAYLOAD_TOO_LARGE = 23, "payload too large";
    /// The client message id was already used for a different message.
    CLIENT_ID_REUSED = 24, "client message id reused for a different message";
    /// The message kind may not be sent by clients.
    KIND_NOT_ALLOWED = 25, "message kind not allowed from clients";
    /// The server has no room for this connection.
    TOO_MANY_CONNECTIONS = 30, "too many connections";
    /// The server is shutting down; reconnect elsewhere or later.
    SHUTTING_DOWN = 31, "server shutting down";
    /// Nothing was received within the idle timeout.
    IDLE_TIMEOUT = 32, "idle timeout";
    /// The client has too many sends awaiting acknowledgement.
    TOO_MANY_IN_FLIGHT = 33, "too many sends in flight";
    /// Too many connections (in all, or from the client's address) have not
    /// authenticated yet; the stream is closed.
    TOO_MANY_UNAUTHENTICATED = 34, "too many connections waiting to authenticate";
    /// Too many new connections from the client's address per second; the
    /// stream is closed.
    CONNECTION_RATE_LIMITED = 35, "too many new connections per second";
    /// The user or connection sent more per second than allowed; the send
    /// was not stored, the stream stays open. Retry after a pause.
    SEND_RATE_LIMITED = 36, "too many sends per second";
    /// The sender is not a member of the group (or the group does not exist).
    NOT_A_MEMBER = 40, "not a member of the group";
    /// Only a group admin may do this.
    NOT_GROUP_ADMIN = 41, "only group admins may do this";
    /// The group would exceed its member limit.
    GROUP_FULL = 42, "group member limit reached";
    /// A user would exceed the limit of groups per user.
    TOO_MANY_GROUPS = 43, "too many groups for a user";
    /// A broadcast list would exceed its recipient limit.
    LIST_TOO_LARGE = 44, "broadcast list too large";
    /// No broadcast list with this id.
    NO_SUCH_LIST = 45, "no such broadcast list";
    /// The contact list would exceed its limit.
    TOO_MANY_CONTACTS = 46, "too many contacts";
    /// No such status, or it expired, or the viewer is not in its audience.
    NO_SUCH_STATUS = 47, "no such status";
    /// The request's fields are not valid together (unknown op, empty list, self-reference).
    INVALID_REQUEST = 48, "invalid request";
    /// The server could not complete the request (storage failure); retry later.
    INTERNAL = 50, "internal error";
    /// The server is temporarily overloaded; retry with backoff.
    OVERLOADED = 51, "overloaded";
    /// The node's disk is (nearly) full: the message was not stored; reads
    /// go on. Retry later with the same client message id.
    STORAGE_FULL = 52, "storage full";
    /// The cluster node that owns the destination (or the sender's own
    /// shard) cannot be reached now: the message was not stored. Retry
    /// with the same client message id after the hint (see
    /// [`retry_after_ms`]).
    SHARD_UNAVAILABLE = 53, "shard unavailable";
    /// A business operation names a user who is not a registered business.
    NOT_A_BUSINESS = 60, "not a business";
    /// A business-initiated message (a template) to a customer without a
    /// current opt-in for the template's purpose.
    NO_CONSENT = 61, "no consent from the customer";
    /// A free-form message from a business outside the customer's 24-hour
    /// service window: only approved templates may be sent.
    OUTSIDE_WINDOW = 62, "outside the customer service window";
    /// No template with this name, or no version in the language asked.
    NO_SUCH_TEMPLATE = 63, "no such template";
    /// The template is pending review, rejected or disabled.
    TEMPLATE_NOT_APPROVED = 64, "template not approved";
    /// The template is paused for low quality; retry after the hint.
    TEMPLATE_PAUSED = 65, "template paused";
    /// The template parameters do not match the template.
    TEMPLATE_PARAMS_INVALID = 66, "template parameters invalid";
    /// The business has started conversations with as many customers in
    /// the last 24 hours as its messaging tier allows.
    TIER_LIMIT_REACHED = 67, "messaging tier limit reached";
    /// Over the business's messages per second, or its rate to one
    /// customer; retry after the hint.
    BUSINESS_RATE_LIMITED = 68, "business rate limited";
    /// The customer blocks this business.
    BLOCKED_BY_CUSTOMER = 69, "blocked by the customer";
    /// The customer has had as many marketing messages, from all
    /// businesses together, as the platform allows per day; retry after
    /// the hint.
    MARKETING_CAP_REACHED = 70, "marketing cap reached for the customer";
}

/// The prefix of an `Error` message that carries a retry-after hint:
/// `retry after 250 ms: ...`.
pub const RETRY_AFTER_PREFIX: &str = "retry after ";

/// The retry-after hint an `Error` frame's message carries, in
/// milliseconds (`SHARD_UNAVAILABLE` always has one).
pub fn retry_after_ms(message: &str) -> Option<u64> {
    let rest = message.strip_prefix(RETRY_AFTER_PREFIX)?;
    let (ms, _) = rest.split_once(" ms")?;
    ms.parse().ok()
}

/// An `Error` message with a retry-after hint, as [`retry_after_ms`] reads it.
pub fn with_retry_after(ms: u64, message: &str) -> String {
    format!("{RETRY_AFTER_PREFIX}{ms} ms: {message}")
}

impl ErrorCode {
    /// True when the server closes the stream after sending this code.
    pub fn closes_stream(self) -> bool {
        matches!(
            self,
            ErrorCode::MALFORMED_FRAME
                | ErrorCode::FRAME_TOO_LARGE
                | ErrorCode::UNSUPPORTED_VERSION
                | ErrorCode::UNKNOWN_FRAME_TYPE
                | ErrorCode::HANDSHAKE_TIMEOUT
                | ErrorCode::AUTH_FAILED
                | ErrorCode::TOKEN_EXPIRED
                | ErrorCode::TOO_MANY_CONNECTIONS
                | ErrorCode::TOO_MANY_UNAUTHENTICATED
                | ErrorCode::CONNECTION_RATE_LIMITED
                | ErrorCode::SHUTTING_DOWN
                | ErrorCode::IDLE_TIMEOUT
        )
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.0, self.description())
    }
}
