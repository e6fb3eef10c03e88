//! The API's one error type, and how it reaches clients: a GraphQL error whose
//! `extensions.code` is stable (see API.md). Internal errors are logged once, with their chain,
//! and shown without detail.

use async_graphql::ErrorExtensions as _;
use std::sync::Arc;
use zpanel_commands::CommandError;

/// Why a request failed.
///
/// Deliberately not `Display`: async-graphql turns any `Display` error into a GraphQL error
/// without extensions, and a `?` would silently take that path and lose the code. This type
/// reaches clients only through its own conversion, below.
#[derive(Clone, Debug)]
pub enum ApiError {
    /// No token, or one that is unknown, expired or revoked.
    Unauthenticated,
    /// The token lacks an ability.
    Forbidden(&'static str),
    /// Nothing with that id in the caller's team.
    NotFound(&'static str),
    /// An input field broke a rule.
    InvalidInput {
        /// The input field, as the client named it.
        field: String,
        /// The rule it broke.
        rule: String,
    },
    /// The request conflicts with the current state (a domain rule, a concurrent change).
    Conflict(String),
    /// A request, token or socket went past a limit the operator set (an answer's size, open
    /// subscriptions); the message says which.
    LimitExceeded(String),
    /// The token sent too many requests.
    RateLimited {
        /// When the next request would be accepted.
        retry_after_ms: u64,
    },
    /// Something failed on our side.
    Internal(Arc<anyhow::Error>),
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(Arc::new(error))
    }
}

impl ApiError {
    /// An invalid input field.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::InvalidInput { field: field.to_owned(), rule: rule.to_string() }
    }

    /// What the client is told.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::Unauthenticated => "a valid API token is required (Authorization: Bearer zp_…)".into(),
            Self::Forbidden(ability) => format!("this token lacks the `{ability}` ability"),
            Self::NotFound(what) => format!("{what} not found"),
            Self::InvalidInput { field, rule } => format!("{field}: {rule}"),
            Self::Conflict(message) | Self::LimitExceeded(message) => message.clone(),
            Self::RateLimited { retry_after_ms } => format!("rate limit exceeded; retry after {retry_after_ms} ms"),
            Self::Internal(_) => "internal error".into(),
        }
    }

    /// As an `anyhow` error, keeping an internal error's chain.
    #[must_use]
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            Self::Internal(e) => anyhow::anyhow!("{e:#}"),
            other => anyhow::anyhow!(other.message()),
        }
    }

    /// The stable code clients branch on.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::NotFound(_) => "NOT_FOUND",
            Self::InvalidInput { .. } => "INVALID_INPUT",
            Self::Conflict(_) => "CONFLICT",
            Self::LimitExceeded(_) => "LIMIT_EXCEEDED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// A command's failure, for an aggregate called `what` in messages.
    pub fn from_command<E: zpanel_domain::Rejection>(what: &'static str, error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(rule) if rule.is_not_found() => Self::NotFound(what),
            CommandError::Rejected(rule) => match rule.field() {
                Some(field) => Self::invalid(field, rule),
                None => Self::Conflict(rule.to_string()),
            },
            CommandError::NotFound => Self::NotFound(what),
            CommandError::Conflict { kind } => {
                Self::Conflict(format!("the {kind} was changed concurrently; try again"))
            }
            taken @ CommandError::DomainTaken { .. } => Self::Conflict(taken.to_string()),
            CommandError::Internal(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        anyhow::Error::new(error).context("querying the read models").into()
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        if let ApiError::Internal(e) = &error {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let message = error.message();
        let code = error.code();
        async_graphql::Error::new(message).extend_with(|_, extensions| {
            extensions.set("code", code);
            match &error {
                ApiError::InvalidInput { field, rule } => {
                    extensions.set("field", field.as_str());
                    extensions.set("rule", rule.as_str());
                }
                ApiError::RateLimited { retry_after_ms } => extensions.set("retryAfterMs", *retry_after_ms),
                _ => {}
            }
        })
    }
}

/// What resolvers return.
pub type ApiResult<T> = Result<T, ApiError>;
