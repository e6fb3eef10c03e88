//! Git push webhooks: `POST /webhooks/{provider}/{applicationId}` from GitHub, GitLab, Gitea or
//! Bitbucket queues a deployment of the application when its branch (or tag) moves.
//!
//! There is no API token: the application id in the path names the application (and so its
//! team), and the host proves it knows the application's webhook secret. A delivery is answered
//! in this order, each step only once the one before has passed:
//!
//! 1. an unknown provider or application is `404`; a body over [`MAX_BODY`](crate::http::MAX_BODY)
//!    is `413`;
//! 2. the signature (GitLab: the token) must match the application's webhook secret, compared in
//!    constant time, before the payload is read at all ([`verify`]); otherwise `401`, also when a
//!    header or the secret is missing — there is no "unsigned" mode;
//! 3. an archived application answers `409` to everything, so the host shows the hook as failing
//!    and someone removes it;
//! 4. the payload must parse ([`parse_push`]), else `400`; pings, other events, deleted refs,
//!    pushes to refs the application does not track and applications built from an image are
//!    acknowledged and ignored: `200 {"ignored": "<why>"}`;
//! 5. otherwise a deployment of the application as it is now is queued, with the reason
//!    `webhook` and the pushed commit: `202 {"deploymentId": "…"}`.
//!
//! The command id is a UUID v5 of the application, the provider and the digest of the signed
//! body, so a redelivered webhook answers with the first delivery's deployment and queues
//! nothing twice. Not the host's delivery id: that header is outside the signature, and a
//! captured delivery replayed with a fresh id would queue again. (Deliveries recorded before
//! were keyed by their delivery id; a redelivery of one is still recognised by it.)

use crate::ApiState;
use crate::error::ApiError;
use crate::schema::mutation::{execute, outcome_id};
use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::fmt;
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_commands::{Actor, CommandContext, EventStore as _};
use zpanel_domain::application::{Application, Source};
use zpanel_domain::deployment::{Deployment, DeploymentCommand, DeploymentReason};
use zpanel_domain::ids::{ApplicationId, DeploymentId, TeamId};
use zpanel_domain::values::GitRef;

/// Longest delivery id accepted from a header (the hosts send UUIDs).
const MAX_DELIVERY_ID: usize = 128;
/// Longest piece of a payload (an event or ref name) repeated in an answer.
const MAX_ECHO: usize = 100;

/// A git host that sends push webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// GitHub (and GitHub Enterprise).
    GitHub,
    /// GitLab.
    GitLab,
    /// Gitea (and Forgejo).
    Gitea,
    /// Bitbucket Cloud.
    Bitbucket,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Self; 4] = [Self::GitHub, Self::GitLab, Self::Gitea, Self::Bitbucket];

    /// The provider named in a webhook's path: `github`, `gitlab`, `gitea` or `bitbucket`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Its name in paths, metrics and event metadata.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::GitLab => "gitlab",
            Self::Gitea => "gitea",
            Self::Bitbucket => "bitbucket",
        }
    }

    /// The header that names the event.
    #[must_use]
    pub const fn event_header(self) -> &'static str {
        match self {
            Self::GitHub => "X-GitHub-Event",
            Self::GitLab => "X-Gitlab-Event",
            Self::Gitea => "X-Gitea-Event",
            Self::Bitbucket => "X-Event-Key",
        }
    }

    /// The event header's value for a push (GitLab also sends `Tag Push Hook` for tags).
    #[must_use]
    pub const fn push_event(self) -> &'static str {
        match self {
            Self::GitHub | Self::Gitea => "push",
            Self::GitLab => "Push Hook",
            Self::Bitbucket => "repo:push",
        }
    }

    /// The header with the host's id of the delivery, the same on a redelivery.
    #[must_use]
    pub const fn delivery_header(self) -> &'static str {
        match self {
            Self::GitHub => "X-GitHub-Delivery",
            Self::GitLab => "X-Gitlab-Event-UUID",
            Self::Gitea => "X-Gitea-Delivery",
            Self::Bitbucket => "X-Request-UUID",
        }
    }

    /// The header with the signature (GitLab: the secret itself).
    #[must_use]
    pub const fn signature_header(self) -> &'static str {
        match self {
            Self::GitHub => "X-Hub-Signature-256",
            Self::GitLab => "X-Gitlab-Token",
            Self::Gitea => "X-Gitea-Signature",
            Self::Bitbucket => "X-Hub-Signature",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a webhook's header values are looked up: a request's [`HeaderMap`], or name–value
/// pairs (tests, the fuzzer).
pub trait Headers {
    /// The first value of header `name` (case-insensitive), if it is there and is text.
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name)?.to_str().ok()
    }
}

impl Headers for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

/// Why a delivery was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The application has no webhook secret to check the signature against.
    #[error("the application has no webhook secret")]
    NoSecret,
    /// The signature header is missing or empty.
    #[error("the {0} header is missing")]
    MissingSignature(&'static str),
    /// The signature (or token) does not match the application's webhook secret.
    #[error("the signature does not match the application's webhook secret")]
    BadSignature,
    /// A header the provider always sends is missing.
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    /// A header has the wrong form.
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    /// The body is not the provider's payload for its event.
    #[error("the payload is not a valid push: {0}")]
    InvalidPayload(String),
}

impl WebhookError {
    /// The HTTP status it is answered with: `401` for anything about the signature, `400` for
    /// the rest.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoSecret | Self::MissingSignature(_) | Self::BadSignature => StatusCode::UNAUTHORIZED,
            Self::MissingHeader(_) | Self::MalformedHeader(_) | Self::InvalidPayload(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// A webhook delivery, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The host's id of this delivery, the same when it is redelivered; `sha256:<hex>` of the
    /// body when the host sent none.
    pub id: String,
    /// What it announces.
    pub event: Event,
}

/// What a delivery announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A branch or tag now points at a commit.
    Push(Push),
    /// Something to acknowledge and otherwise ignore.
    Ignored(Ignored),
}

/// A push: a branch or tag moved to (or was created at) a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// The ref that moved.
    pub pushed: PushedRef,
    /// The commit it points at now: 40 lowercase hexadecimal digits.
    pub commit: String,
}

/// The ref a push moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushedRef {
    /// `refs/heads/<name>`.
    Branch(GitRef),
    /// `refs/tags/<name>`.
    Tag(GitRef),
}

impl PushedRef {
    /// The branch or tag name.
    #[must_use]
    pub fn name(&self) -> &GitRef {
        match self {
            Self::Branch(name) | Self::Tag(name) => name,
        }
    }

    /// Whether this is the ref an application tracks: its `gitRef` names this branch or tag,
    /// either by name (`main`) or in full (`refs/heads/main`).
    #[must_use]
    pub fn is_tracked_by(&self, tracked: &GitRef) -> bool {
        tracked == self.name() || tracked.as_str() == self.to_string()
    }
}

impl fmt::Display for PushedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Branch(name) => write!(f, "refs/heads/{name}"),
            Self::Tag(name) => write!(f, "refs/tags/{name}"),
        }
    }
}

/// Why a delivery is acknowledged without doing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// The host checking that the hook works (GitHub's `ping`, Bitbucket's `diagnostics:ping`).
    Ping,
    /// An event other than a push (`pull_request`, `issues`, …).
    OtherEvent(String),
    /// A push that deleted a branch or tag.
    Deleted(String),
    /// A push to a ref that is neither a branch nor a tag (`refs/notes/…`).
    OtherRef(String),
    /// A push that names no branch or tag (Bitbucket truncates very large pushes).
    NoRef,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ping => f.write_str("a ping: the webhook works"),
            Self::OtherEvent(event) => write!(f, "a {event:?} event, not a push"),
            Self::Deleted(git_ref) => write!(f, "a push that deleted {git_ref}"),
            Self::OtherRef(git_ref) => write!(f, "a push to {git_ref}, which is neither a branch nor a tag"),
            Self::NoRef => f.write_str("a push that names no branch or tag"),
        }
    }
}

/// Checks that `body` comes from someone who knows `secret`, as `provider` proves it: an
/// HMAC-SHA256 of the body (GitHub `X-Hub-Signature-256: sha256=<hex>`, Gitea
/// `X-Gitea-Signature: <hex>`, Bitbucket `X-Hub-Signature: sha256=<hex>`) or the secret itself
/// (GitLab `X-Gitlab-Token`). Every comparison takes the same time whatever the input.
///
/// # Errors
/// [`WebhookError::NoSecret`] for an empty secret, [`WebhookError::MissingSignature`] when the
/// header is missing or empty, [`WebhookError::BadSignature`] when it does not match.
pub fn verify<H: Headers + ?Sized>(
    provider: Provider,
    headers: &H,
    body: &[u8],
    secret: &[u8],
) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::NoSecret);
    }
    let name = provider.signature_header();
    let value = headers.header(name).map(str::trim).filter(|v| !v.is_empty());
    let value = value.ok_or(WebhookError::MissingSignature(name))?;
    match provider {
        Provider::GitLab => {
            // Digests are compared, not the strings: both sides then have the same length, so
            // not even the secret's length shows in the time taken.
            let matches = Sha256::digest(value.as_bytes()).ct_eq(&Sha256::digest(secret));
            if bool::from(matches) { Ok(()) } else { Err(WebhookError::BadSignature) }
        }
        Provider::GitHub | Provider::Bitbucket => {
            let hex = value.strip_prefix("sha256=").ok_or(WebhookError::BadSignature)?;
            hmac_matches(hex, body, secret)
        }
        Provider::Gitea => hmac_matches(value, body, secret),
    }
}

/// Whether `hex` is the HMAC-SHA256 of `body` under `secret`.
fn hmac_matches(hex: &str, body: &[u8], secret: &[u8]) -> Result<(), WebhookError> {
    let signature = hex::decode(hex).map_err(|_| WebhookError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| WebhookError::NoSecret)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature).map_err(|_| WebhookError::BadSignature)
}

/// Reads a delivery: its id, and whether it is a push (of which ref, to which commit) or
/// something to ignore. Pure and total: any bytes and headers give `Ok` or `Err`, never a panic.
/// It does not check the signature: call [`verify`] first.
///
/// # Errors
/// [`WebhookError::MissingHeader`] without the event header, [`WebhookError::MalformedHeader`]
/// for an overlong delivery id, [`WebhookError::InvalidPayload`] when a push's body is not the
/// provider's push payload (or names an invalid ref or commit).
pub fn parse_push<H: Headers + ?Sized>(provider: Provider, headers: &H, body: &[u8]) -> Result<Delivery, WebhookError> {
    let id = delivery_id(provider, headers, body)?;
    let name = provider.event_header();
    let event = headers.header(name).map(str::trim).filter(|e| !e.is_empty());
    let event = event.ok_or(WebhookError::MissingHeader(name))?;
    let event = match (provider, event) {
        (Provider::GitHub | Provider::Gitea, "push") | (Provider::GitLab, "Push Hook" | "Tag Push Hook") => {
            let update: RefUpdate = payload(body)?;
            ref_update(&update.git_ref, &update.after)?
        }
        (Provider::Bitbucket, "repo:push") => bitbucket_push(payload(body)?)?,
        (Provider::GitHub, "ping") | (Provider::Bitbucket, "diagnostics:ping") => Event::Ignored(Ignored::Ping),
        (_, other) => Event::Ignored(Ignored::OtherEvent(clip(other))),
    };
    Ok(Delivery { id, event })
}

/// The delivery id from the provider's header, or a digest of the body when there is none
/// (GitLab sends `X-Gitlab-Event-UUID` only since 13.x): an identical body is then taken for a
/// redelivery, which is what it is for a push — the same ref to the same commit.
fn delivery_id<H: Headers + ?Sized>(provider: Provider, headers: &H, body: &[u8]) -> Result<String, WebhookError> {
    let name = provider.delivery_header();
    match headers.header(name).map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) if id.len() > MAX_DELIVERY_ID => Err(WebhookError::MalformedHeader(name)),
        Some(id) => Ok(id.to_owned()),
        None => Ok(format!("sha256:{}", hex::encode(Sha256::digest(body)))),
    }
}

fn payload<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WebhookError> {
    serde_json::from_slice(body).map_err(|e| WebhookError::InvalidPayload(e.to_string()))
}

/// The part of a GitHub, Gitea or GitLab push payload read here.
#[derive(Deserialize)]
struct RefUpdate {
    /// `refs/heads/<branch>` or `refs/tags/<tag>`.
    #[serde(rename = "ref")]
    git_ref: String,
    /// The commit the ref points at now; all zeros when the push deleted it.
    after: String,
}

/// A ref given in full (`refs/heads/main`) that now points at `after`.
fn ref_update(full: &str, after: &str) -> Result<Event, WebhookError> {
    let Some(commit) = commit(after)? else { return Ok(Event::Ignored(Ignored::Deleted(clip(full)))) };
    let pushed = if let Some(branch) = full.strip_prefix("refs/heads/") {
        PushedRef::Branch(ref_name(branch)?)
    } else if let Some(tag) = full.strip_prefix("refs/tags/") {
        PushedRef::Tag(ref_name(tag)?)
    } else {
        return Ok(Event::Ignored(Ignored::OtherRef(clip(full))));
    };
    Ok(Event::Push(Push { pushed, commit }))
}

fn ref_name(name: &str) -> Result<GitRef, WebhookError> {
    GitRef::parse(name).map_err(|e| WebhookError::InvalidPayload(format!("the ref name {:?} {}", clip(name), e.rule)))
}

/// A commit id, lowercased; `None` for the all-zero id of a deleted ref.
fn commit(id: &str) -> Result<Option<String>, WebhookError> {
    if id.len() != 40 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(WebhookError::InvalidPayload("a commit must be 40 hexadecimal digits".into()));
    }
    Ok((!id.bytes().all(|b| b == b'0')).then(|| id.to_ascii_lowercase()))
}

/// Bitbucket's `repo:push` payload: `push.changes[]`, each with the ref before (`old`) and after
/// (`new`, `null` when the push deleted it).
#[derive(Deserialize)]
struct BitbucketBody {
    push: BitbucketPush,
}

#[derive(Deserialize)]
struct BitbucketPush {
    changes: Vec<BitbucketChange>,
}

#[derive(Deserialize)]
struct BitbucketChange {
    #[serde(default)]
    old: Option<BitbucketRef>,
    #[serde(default)]
    new: Option<BitbucketRef>,
}

#[derive(Deserialize)]
struct BitbucketRef {
    /// `branch` or `tag` (once also `named_branch`, `bookmark`).
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    target: Option<BitbucketTarget>,
}

#[derive(Deserialize)]
struct BitbucketTarget {
    #[serde(default)]
    hash: Option<String>,
}

/// One push may move several refs; a deployment follows a branch, so the last branch that
/// moved is the one read, and only when no branch moved the last tag.
fn bitbucket_push(body: BitbucketBody) -> Result<Event, WebhookError> {
    let changes = body.push.changes;
    let moved = |kind: &str| changes.iter().rev().find_map(|c| c.new.as_ref().filter(|new| new.kind == kind));
    let Some(new) = moved("branch").or_else(|| moved("tag")) else {
        let deleted = changes.iter().rev().find_map(|c| c.old.as_ref().filter(|_| c.new.is_none()));
        return Ok(Event::Ignored(match deleted.and_then(|old| old.name.as_deref()) {
            Some(name) => Ignored::Deleted(clip(name)),
            None => Ignored::NoRef,
        }));
    };
    let missing = |what: &str| WebhookError::InvalidPayload(format!("a changed {} has no {what}", new.kind));
    let name = new.name.as_deref().ok_or_else(|| missing("name"))?;
    let hash = new.target.as_ref().and_then(|t| t.hash.as_deref()).ok_or_else(|| missing("target.hash"))?;
    let Some(commit) = commit(hash)? else { return Ok(Event::Ignored(Ignored::Deleted(clip(name)))) };
    let pushed =
        if new.kind == "branch" { PushedRef::Branch(ref_name(name)?) } else { PushedRef::Tag(ref_name(name)?) };
    Ok(Event::Push(Push { pushed, commit }))
}

/// At most [`MAX_ECHO`] characters of `s`, to repeat in an answer.
fn clip(s: &str) -> String {
    s.chars().take(MAX_ECHO).collect()
}

/// What a delivery came to.
enum Answer {
    /// A deployment was queued, by this delivery or by an earlier one with the same id.
    Queued { deployment: Uuid, repeated: bool },
    /// Nothing to do, and why.
    Ignored(String),
}

/// Why a delivery was refused: the status, the metrics label and what the host is told.
struct Refusal {
    status: StatusCode,
    outcome: &'static str,
    message: String,
}

impl Refusal {
    fn not_found() -> Self {
        Self { status: StatusCode::NOT_FOUND, outcome: "not_found", message: "application not found".into() }
    }

    fn internal(error: &anyhow::Error) -> Self {
        tracing::error!(error = format!("{error:#}"), "webhook");
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, outcome: "error", message: "internal error".into() }
    }
}

impl From<WebhookError> for Refusal {
    fn from(error: WebhookError) -> Self {
        let status = error.status();
        let outcome = if status == StatusCode::UNAUTHORIZED { "unauthorized" } else { "invalid" };
        Self { status, outcome, message: error.to_string() }
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::NotFound(_) => Self::not_found(),
            ApiError::Conflict(message) => Self { status: StatusCode::CONFLICT, outcome: "conflict", message },
            ApiError::Internal(e) => Self::internal(&e),
            other => Self::internal(&other.into_anyhow()),
        }
    }
}

/// Answers `POST /webhooks/{provider}/{application}` (see the module's documentation).
pub(crate) async fn receive(
    state: &ApiState,
    provider: &str,
    application: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Some(provider) = Provider::parse(provider) else {
        let message = "unknown webhook provider: use github, gitlab, gitea or bitbucket";
        return (StatusCode::NOT_FOUND, Json(json!({ "error": message }))).into_response();
    };
    let (outcome, response) = match handle(state, provider, application, headers, body).await {
        Ok(Answer::Queued { deployment, repeated }) => (
            if repeated { "repeated" } else { "queued" },
            (StatusCode::ACCEPTED, Json(json!({ "deploymentId": deployment, "repeated": repeated }))),
        ),
        Ok(Answer::Ignored(reason)) => ("ignored", (StatusCode::OK, Json(json!({ "ignored": reason })))),
        Err(refusal) => (refusal.outcome, (refusal.status, Json(json!({ "error": refusal.message })))),
    };
    state.metrics.webhook(provider.as_str(), outcome);
    response.into_response()
}

async fn handle(
    state: &ApiState,
    provider: Provider,
    application: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Answer, Refusal> {
    let app_id = Uuid::parse_str(application).map_err(|_| Refusal::not_found())?;
    // The stream, not the read model: it names the team too, and a hook set up right after the
    // application was created cannot race the projections.
    let stream_id = ApplicationId::from_uuid(app_id).stream_id();
    let stream = state.handler.store().read_stream(&stream_id, 0).await.map_err(|e| Refusal::internal(&e))?;
    let app = zpanel_commands::handler::fold::<Application>(&stream.events).map_err(|e| Refusal::internal(&e))?;
    let (Some(team_id), Some(app_state)) = (stream.team_id, app.state()) else { return Err(Refusal::not_found()) };

    let secret = state.keyring.open(&app_state.webhook_secret).map_err(|e| Refusal::internal(&e.into()))?;
    verify(provider, headers, body, secret.expose().as_bytes())?;
    if app.is_archived() {
        let message = "the application is archived; remove this webhook".to_owned();
        return Err(Refusal { status: StatusCode::CONFLICT, outcome: "archived", message });
    }
    let delivery = parse_push(provider, headers, body)?;
    let push = match delivery.event {
        Event::Push(push) => push,
        Event::Ignored(why) => return Ok(Answer::Ignored(why.to_string())),
    };
    let Source::Git { git_ref, .. } = &app_state.source else {
        return Ok(Answer::Ignored("the application deploys an image, not a git repository".into()));
    };
    if !push.pushed.is_tracked_by(git_ref) {
        return Ok(Answer::Ignored(format!("a push to {}; the application deploys {git_ref}", push.pushed)));
    }

    let body_digest = hex::encode(Sha256::digest(body));
    let command_id = Uuid::new_v5(&app_id, format!("webhook:{provider}:body:sha256:{body_digest}").as_bytes());
    let by_delivery_id = Uuid::new_v5(&app_id, format!("webhook:{provider}:{}", delivery.id).as_bytes());
    for earlier in [command_id, by_delivery_id] {
        if let Some(deployment) = queued_by(state, earlier).await? {
            return Ok(Answer::Queued { deployment, repeated: true });
        }
    }
    let origin = format!("webhook:{provider}");
    let ctx = CommandContext::new(TeamId::from_uuid(team_id), Actor::webhook(provider.as_str()), &origin)
        .with_command_id(command_id);
    let id = DeploymentId::new();
    let reason = DeploymentReason::Webhook { commit: Some(push.commit) };
    let now = OffsetDateTime::now_utc();
    let command = DeploymentCommand::QueueDeployment { id, application: app, reason, image: None, release: None, now };
    // No wait for the read models, unlike a mutation: hosts give a webhook ten seconds or so,
    // and the answer holds the deployment's id already.
    match execute::<Deployment>(state, &ctx, "deployment", *id.as_uuid(), &command).await {
        Ok(outcome) => Ok(Answer::Queued { deployment: outcome_id(&outcome)?, repeated: outcome.repeated }),
        Err(error) => match queued_by(state, command_id).await? {
            // A redelivery that raced its first delivery lost on the command id: same answer.
            Some(deployment) => Ok(Answer::Queued { deployment, repeated: true }),
            None => Err(error.into()),
        },
    }
}

/// The deployment that command `command_id` queued, if it ran.
async fn queued_by(state: &ApiState, command_id: Uuid) -> Result<Option<Uuid>, Refusal> {
    let events = state.handler.store().find_command(command_id).await.map_err(|e| Refusal::internal(&e))?;
    Ok(events.and_then(|events| events.first().and_then(|e| zpanel_commands::store::aggregate_uuid(&e.stream_id))))
}

#[cfg(test)]
mod tests;
