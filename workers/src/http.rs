//! Plain HTTP/1.1 to the services a deployment talks to — Caddy's admin API, an application's
//! health check, a request through the proxy — over a [`Dial`]: on this machine, or from a
//! server through its pooled SSH connection. Every request has a deadline; answers are read up
//! to [`MAX_ANSWER`].

use crate::remote::Dial;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The most of an answer read.
pub const MAX_ANSWER: usize = 8 << 20;

/// An HTTP client bound to one place.
#[derive(Clone, Debug)]
pub struct Http {
    client: Client<Dial, Full<Bytes>>,
    timeout: Duration,
}

/// An answer, read whole.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its body.
    pub body: Bytes,
}

impl Answer {
    /// The body as text (lossy).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// None within the deadline.
    #[error("no answer within {0:.1} s")]
    Timeout(f32),
    /// The connection or the exchange failed; the innermost reason.
    #[error("{0}")]
    Failed(String),
}

impl Http {
    /// A client dialling with `dial`, giving each request `timeout`. Connections are not kept:
    /// Caddy closes its admin API's idle ones on every config load, and a health check's
    /// target changes with each release.
    #[must_use]
    pub fn new(dial: Dial, timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(dial);
        Self { client, timeout }
    }

    /// Sends `method url` with an optional `Host` header and JSON body; reads the answer.
    ///
    /// # Errors
    /// [`HttpError::Timeout`] when the whole exchange takes longer than the deadline;
    /// [`HttpError::Failed`] with the innermost reason otherwise.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        host: Option<&str>,
        json: Option<&serde_json::Value>,
    ) -> Result<Answer, HttpError> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(host) = host {
            request = request.header(header::HOST, host);
        }
        let body = match json {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(|e| HttpError::Failed(format!("{url}: {e}")))?;
        let exchange = async {
            let answer = self.client.request(request).await.map_err(|e| HttpError::Failed(root_cause(&e)))?;
            let status = answer.status();
            let body = Limited::new(answer.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| HttpError::Failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout.as_secs_f32()))?
    }

    /// `GET url`.
    ///
    /// # Errors
    /// As [`Self::send`].
    pub async fn get(&self, url: &str) -> Result<Answer, HttpError> {
        self.send(Method::GET, url, None, None).await
    }
}

/// The innermost error of a chain: what actually went wrong.
#[must_use]
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
