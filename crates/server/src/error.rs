//! Errors: [`ServerError`] for the library's callers (binding, loading), and
//! [`ApiError`] for HTTP clients.
//!
//! An `ApiError` is rendered in the dialect of the endpoint that produced it:
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` everywhere except
//! under `/v1/messages`, which gets Anthropic's
//! `{"type": "error", "error": {"type", "message"}}`. Client mistakes are always
//! 4xx and name the offending field; 5xx is reserved for the engine failing.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Failures of the server as a whole (reported to whoever started it). The underlying
/// I/O error is the `source`, not repeated in the message (callers print the chain).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the engine thread")]
    Thread(#[source] std::io::Error),
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("the HTTP server failed")]
    Http(#[source] std::io::Error),
}

/// Which API's error shape a response uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    /// The dialect of a request path: Anthropic for the Messages API, OpenAI otherwise.
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// An error answered to an HTTP client.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI `code` (also decides the Anthropic `type` for non-400s).
    pub code: Option<&'static str>,
    /// The request field at fault, as a path (`messages[2].role`).
    pub param: Option<String>,
    pub message: String,
    pub dialect: Dialect,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: Option<&'static str>,
        param: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code,
            param,
            message: message.into(),
            dialect: Dialect::OpenAi,
        }
    }

    /// 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, None, Some(param.into()), message)
    }

    /// 400 not tied to one field (malformed JSON, ...).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some(code), None, message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            Some("invalid_api_key"),
            None,
            "missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        )
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Some("not_found"), None, what)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Some("method_not_allowed"),
            None,
            "method not allowed on this path",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("request_too_large"),
            None,
            format!("request body exceeds the {limit}-byte limit"),
        )
    }

    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            Some("request_timeout"),
            None,
            "the request body did not arrive in time",
        )
    }

    pub fn queue_full(capacity: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            Some("queue_full"),
            None,
            format!("the server is busy: {capacity} requests are already waiting; retry later"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("unavailable"),
            None,
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("internal_error"),
            None,
            message,
        )
    }

    pub fn dialect(mut self, d: Dialect) -> Self {
        self.dialect = d;
        self
    }

    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body in this error's dialect.
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.param,
                "code": self.code,
            }}),
            Dialect::Anthropic => {
                let message = match &self.param {
                    Some(p) => format!("{p}: {}", self.message),
                    None => self.message.clone(),
                };
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_names_the_field() {
        let b = ApiError::invalid("temperature", "must be a number").body();
        assert_eq!(b["error"]["param"], "temperature");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"]["code"].is_null());
    }

    #[test]
    fn anthropic_shape() {
        let b = ApiError::invalid("max_tokens", "is required")
            .dialect(Dialect::Anthropic)
            .body();
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "max_tokens: is required");
        let b = ApiError::unauthorized().dialect(Dialect::Anthropic).body();
        assert_eq!(b["error"]["type"], "authentication_error");
    }
}
