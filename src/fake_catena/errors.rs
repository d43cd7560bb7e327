//! The API's error answers, in Catena's two shapes: `{code, message, detail: null}` for most, and
//! FastAPI's `{"detail":[{loc,msg,type}]}` for a 422 (catena-control-plane.md §1.2).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::catena::model::ErrorBody;

#[derive(Debug)]
pub(super) enum ApiError {
    Plain {
        status: StatusCode,
        code: &'static str,
        message: String,
        /// Seconds, for a 429 with `Retry-After`.
        retry_after: Option<u64>,
    },
    /// One `{loc, msg, type}` per problem.
    Validation(Vec<Value>),
}

impl ApiError {
    fn plain(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Plain {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::plain(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    pub fn forbidden(scope: &str) -> Self {
        Self::plain(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("the token lacks scope {scope}"),
        )
    }

    pub fn not_found(id: &str) -> Self {
        Self::plain(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("webhook subscription {id} not found"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::plain(StatusCode::CONFLICT, "Conflict", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::plain(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn too_many_requests(retry_after: Option<u64>) -> Self {
        Self::Plain {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "TooManyRequests",
            message: "rate limit exceeded".into(),
            retry_after,
        }
    }

    /// An answer injected by `fail_next`.
    pub fn injected(status: StatusCode) -> Self {
        Self::plain(
            status,
            status.canonical_reason().unwrap_or("Error"),
            "injected by fake-catena",
        )
    }

    /// A 422 about one input, e.g. `invalid(&["body", "secret"], "...", "string_too_short")`.
    pub fn invalid(loc: &[&str], msg: impl Into<String>, kind: &str) -> Self {
        Self::Validation(vec![json!({"loc": loc, "msg": msg.into(), "type": kind})])
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Plain {
                status,
                code,
                message,
                retry_after,
            } => {
                let body = ErrorBody {
                    code: Some(Value::from(code)),
                    message: Some(message),
                    detail: None,
                };
                let mut response = (status, Json(body)).into_response();
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                response
            }
            ApiError::Validation(problems) => {
                let body = ErrorBody {
                    detail: Some(Value::Array(problems)),
                    ..ErrorBody::default()
                };
                (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
            }
        }
    }
}
