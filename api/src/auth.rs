//! Who is calling: API tokens (`Authorization: Bearer zp_…`) resolved to a team and abilities.
//!
//! Tokens are stored as SHA-256 hashes in the `api_tokens` read model. A presented token is
//! hashed, candidates are looked up by the hash's first 16 hex digits, and each candidate's full
//! hash is compared with the presented one in constant time. Expiry and revocation are checked
//! on every request — and by open subscriptions when the token changes and every few seconds —
//! so a revoked token stops working at once.

use crate::error::{ApiError, ApiResult};
use sqlx::{PgPool, Row as _};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;
use uuid::Uuid;
use zpanel_commands::Actor;
use zpanel_commands::Cursor;
use zpanel_domain::ids::TeamId;
use zpanel_domain::values::{Abilities, Ability};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The team every resolver is scoped to.
    pub team_id: TeamId,
    /// The token's id.
    pub token_id: Uuid,
    /// The token's name.
    pub token_name: String,
    /// What it may do.
    pub abilities: Abilities,
    /// The presented token's hash, to re-check it later.
    token_hash: String,
    /// When the token stops working, if ever.
    pub(crate) expires_at: Option<OffsetDateTime>,
}

impl Caller {
    /// Fails with `FORBIDDEN` unless the token has `ability` (or `root`).
    ///
    /// # Errors
    /// When it lacks the ability.
    pub fn require(&self, ability: Ability) -> ApiResult<()> {
        if self.abilities.allows(ability) { Ok(()) } else { Err(ApiError::Forbidden(ability.as_str())) }
    }

    /// Whether secrets may be shown unmasked.
    #[must_use]
    pub fn sees_secrets(&self) -> bool {
        self.abilities.allows(Ability::ReadSensitive)
    }

    /// The hash of the token presented, to look it up again.
    pub(crate) fn token_hash(&self) -> &str {
        &self.token_hash
    }

    /// The actor recorded on the events this caller causes.
    #[must_use]
    pub fn actor(&self) -> Actor {
        Actor::token(self.token_id, &self.token_name)
    }
}

/// Re-checks of tokens held by open subscriptions, shared: thousands of subscriptions of one
/// token cost one query per interval, not one each.
#[derive(Debug, Default)]
pub struct TokenChecks {
    /// By token hash: when it was checked, how far the read models were then, the answer.
    checked: tokio::sync::Mutex<std::collections::HashMap<String, (Instant, Cursor, bool)>>,
}

impl TokenChecks {
    /// Whether `caller`'s token still works. A check younger than `max_age`, made when the
    /// read models had reached `seen` (the position of a change to the token, if one was seen),
    /// is reused.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn still_valid(
        &self,
        pool: &PgPool,
        caller: &Caller,
        horizon: Cursor,
        seen: Cursor,
        max_age: Duration,
    ) -> ApiResult<bool> {
        // One check at a time: those waiting then find the fresh answer.
        let mut checked = self.checked.lock().await;
        if let Some((at, checked_horizon, valid)) = checked.get(&caller.token_hash)
            && at.elapsed() < max_age
            && *checked_horizon >= seen
        {
            return Ok(*valid);
        }
        let valid = lookup(pool, &caller.token_hash).await?.is_some();
        if checked.len() > 10_000 {
            checked.retain(|_, (at, _, _)| at.elapsed() < max_age);
        }
        // Made now, so it reflects at least everything visible up to `seen`.
        checked.insert(caller.token_hash.clone(), (Instant::now(), horizon.max(seen), valid));
        Ok(valid)
    }
}

/// The token in an `Authorization` header value (`Bearer zp_…`), if it has that form.
#[must_use]
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Resolves a presented token.
///
/// # Errors
/// `UNAUTHENTICATED` for a malformed, unknown, expired or revoked token; `INTERNAL` when the
/// database fails.
pub async fn authenticate(pool: &PgPool, token: &str) -> ApiResult<Caller> {
    if !zpanel_commands::tokens::looks_like_token(token) {
        return Err(ApiError::Unauthenticated);
    }
    let hash = zpanel_commands::tokens::hash(token);
    lookup(pool, &hash).await?.ok_or(ApiError::Unauthenticated)
}

/// The caller of a WebSocket session: the token a client sends in `connection_init`'s payload
/// (`{"authorization": "Bearer zp_…"}`), whichever protocol the session speaks.
///
/// # Errors
/// `UNAUTHENTICATED` without a valid token.
pub async fn connection_init(pool: &PgPool, payload: &serde_json::Value) -> ApiResult<Caller> {
    let header = payload
        .get("authorization")
        .or_else(|| payload.get("Authorization"))
        .and_then(serde_json::Value::as_str)
        .and_then(bearer)
        .ok_or(ApiError::Unauthenticated)?;
    authenticate(pool, header).await
}

/// The caller whose token hashes to `hash`, if the token works now. The one place that decides
/// whether a token works (it exists, is not revoked, has not expired): HTTP requests, every
/// operation sent on a WebSocket and open subscriptions all ask here, so a rule added here (the
/// token's user still in the team) holds on every transport at once.
///
/// # Errors
/// When the database fails.
pub(crate) async fn lookup(pool: &PgPool, hash: &str) -> ApiResult<Option<Caller>> {
    // By prefix, then the whole hash compared in constant time: how long the index takes
    // depends on the prefix only.
    let rows = sqlx::query(
        "select token_id, team_id, name, abilities, token_hash, expires_at, revoked
           from rm_api_tokens where left(token_hash, 16) = $1",
    )
    .bind(hash.get(..16).unwrap_or(hash))
    .fetch_all(pool)
    .await?;
    let mut found = None;
    for row in rows {
        let stored: String = row.try_get("token_hash")?;
        if bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
            found = Some(row);
        }
    }
    let Some(row) = found else { return Ok(None) };
    let stored: String = row.try_get("token_hash")?;
    let revoked: bool = row.try_get("revoked")?;
    let expires_at: Option<OffsetDateTime> = row.try_get("expires_at")?;
    if revoked || expires_at.is_some_and(|at| at <= OffsetDateTime::now_utc()) {
        return Ok(None);
    }
    let names: Vec<String> = row.try_get("abilities")?;
    let abilities = names
        .iter()
        .map(|n| Ability::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("a stored token has an unknown ability: {e}"))?;
    Ok(Some(Caller {
        team_id: TeamId::from_uuid(row.try_get("team_id")?),
        token_id: row.try_get("token_id")?,
        token_name: row.try_get("name")?,
        abilities: Abilities::new(abilities),
        token_hash: stored,
        expires_at,
    }))
}
