//! The reverse proxy: Caddy, configured through its admin API. Zpanel owns one HTTP server in
//! Caddy's config (`zpanel`, listening on `ZPANEL_PROXY_LISTEN`) and up to two routes per
//! application in it, proxying to the loopback port its current container publishes: one for
//! its exact host names (`@id` = `zpanel-app-<application id>`), inserted at the head of the
//! route list, and one for its wildcards (`zpanel-app-<application id>-wildcard`), appended at
//! its end. Caddy tries routes in order, so every exact host is tried before every wildcard:
//! with domains unique across the installation (ADR 0018), no two exact routes and no two
//! wildcard routes match one host, and which application gets a request never depends on the
//! order routes were added in.
//!
//! Switching a release is one `PATCH` of that route: Caddy swaps its config gracefully, so
//! requests in flight finish on the old upstream and new ones go to the new one.
//!
//! Caddy reopens its listeners on every change (`SO_REUSEPORT`: the new socket is bound before
//! the old one closes). Connections the kernel had queued on the old socket are reset when it
//! closes, unless `net.ipv4.tcp_migrate_req` is 1 (Linux 5.14+), which moves them to the new
//! one: without it, about one connection in ten opened during a change was reset here. So the
//! server validation records it as a fact (warned about when off), and [`warn_unless_migrating`]
//! says so for this machine.

use crate::http::{Answer, Http};
use crate::remote::Dial;
use anyhow::Context as _;
use hyper::Method;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

/// The default admin API address.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:2019";
/// The default address of the HTTP server Zpanel creates in Caddy.
pub const DEFAULT_LISTEN: &str = ":80";
/// The server's name in Caddy's config.
const SERVER: &str = "zpanel";

/// Where a new route goes in the server's route list.
#[derive(Clone, Copy, Debug)]
enum Position {
    /// First: exact hosts, tried before any wildcard.
    Head,
    /// Last: wildcards, tried after every exact host.
    Tail,
}

/// Where the kernel says whether a closing listener's queued connections move to its successor.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Whether `setting` (the content of `net.ipv4.tcp_migrate_req`) turns the migration on.
#[must_use]
pub fn migrates(setting: &str) -> bool {
    setting.trim() == "1"
}

/// Logs a warning when this machine's kernel resets, rather than migrates, the connections
/// queued on a listener Caddy closes during a configuration change. Caddy shares this machine's
/// network namespace in every supported layout (embedded, and the compose file's host network).
pub fn warn_unless_migrating() {
    let setting = std::fs::read_to_string(MIGRATE_REQ).unwrap_or_default();
    if !migrates(&setting) {
        tracing::warn!("{} on this machine", zpanel_domain::server::RELOAD_RESETS);
    }
}

/// Caddy's admin API, on this machine or on a server.
#[derive(Clone, Debug)]
pub struct Proxy {
    admin: String,
    listen: String,
    http: Http,
    place: String,
}

impl Proxy {
    /// The Caddy on this machine whose admin API is at `admin`, serving applications on
    /// `listen`.
    ///
    /// # Errors
    /// When `admin` is not an `http://` address.
    pub fn new(admin: &str, listen: &str) -> anyhow::Result<Self> {
        Self::over(admin, listen, Dial::local())
    }

    /// The Caddy reached with `dial` (on a server: `admin` and `listen` are addresses there).
    ///
    /// # Errors
    /// When `admin` is not an `http://` address.
    pub fn over(admin: &str, listen: &str, dial: Dial) -> anyhow::Result<Self> {
        anyhow::ensure!(admin.starts_with("http://"), "Caddy's admin API address {admin:?} must start with http://");
        let place = dial.describe();
        Ok(Self {
            admin: admin.trim_end_matches('/').to_owned(),
            listen: listen.to_owned(),
            http: Http::new(dial, Duration::from_secs(10)),
            place,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&serde_json::Value>) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.admin);
        self.http
            .send(method, &url, None, body)
            .await
            .with_context(|| format!("reaching Caddy's admin API at {} on {}", self.admin, self.place))
    }

    /// The address requests reach the applications at (`ZPANEL_PROXY_LISTEN`).
    #[must_use]
    pub fn listen(&self) -> &str {
        &self.listen
    }

    fn route_id(application_id: Uuid) -> String {
        format!("zpanel-app-{application_id}")
    }

    fn wildcard_route_id(application_id: Uuid) -> String {
        format!("zpanel-app-{application_id}-wildcard")
    }

    /// Both route ids of an application, exact first.
    fn route_ids(application_id: Uuid) -> [String; 2] {
        [Self::route_id(application_id), Self::wildcard_route_id(application_id)]
    }

    /// Creates Zpanel's server in Caddy if it is missing (Caddy forgets its API-made config
    /// when restarted without `--resume`).
    ///
    /// # Errors
    /// When Caddy cannot be reached or refuses.
    pub async fn ensure_server(&self) -> anyhow::Result<()> {
        let path = format!("/config/apps/http/servers/{SERVER}");
        let existing = self.call(Method::GET, &path, None).await?;
        let body = existing.text();
        if existing.status.is_success() && body.trim() != "null" && !body.trim().is_empty() {
            return Ok(());
        }
        // TLS comes with the DNS integration; until then Zpanel's server is plain HTTP.
        let server = json!({ "listen": [self.listen], "routes": [], "automatic_https": { "disable": true } });
        let answer = self.call(Method::PUT, &path, Some(&server)).await.context("creating Zpanel's server in Caddy")?;
        // Another worker may have created it meanwhile.
        if answer.status.is_success() || answer.status.as_u16() == 409 {
            return Ok(());
        }
        let status = answer.status;
        let text = answer.text();
        if text.contains("already exists") {
            return Ok(());
        }
        anyhow::bail!("Caddy refused to create Zpanel's server ({status}): {}", text.trim())
    }

    /// Routes `domains` to `upstream` (`127.0.0.1:port`), replacing the application's routes:
    /// its exact hosts at the head of the route list, its wildcards at the end.
    ///
    /// # Errors
    /// When Caddy cannot be reached or refuses.
    pub async fn route(&self, application_id: Uuid, domains: &[String], upstream: &str) -> anyhow::Result<()> {
        self.ensure_server().await?;
        let (wildcards, exact): (Vec<&String>, Vec<&String>) = domains.iter().partition(|d| d.starts_with("*."));
        self.put_route(&Self::route_id(application_id), &exact, upstream, Position::Head).await?;
        self.put_route(&Self::wildcard_route_id(application_id), &wildcards, upstream, Position::Tail).await
    }

    /// Makes route `id` match `hosts` and proxy to `upstream`: changed where it stands, or
    /// added at `position`; removed when `hosts` is empty.
    async fn put_route(&self, id: &str, hosts: &[&String], upstream: &str, position: Position) -> anyhow::Result<()> {
        if hosts.is_empty() {
            self.call(Method::DELETE, &format!("/id/{id}"), None).await.context("removing a route in Caddy")?;
            return Ok(());
        }
        let route = json!({
            "@id": id,
            "match": [{ "host": hosts }],
            "handle": [{ "handler": "reverse_proxy", "upstreams": [{ "dial": upstream }] }],
            "terminal": true,
        });
        let patched = self
            .call(Method::PATCH, &format!("/id/{id}"), Some(&route))
            .await
            .context("updating the route in Caddy")?;
        if patched.status.is_success() {
            return Ok(());
        }
        let routes = format!("/config/apps/http/servers/{SERVER}/routes");
        // PUT at an index inserts before it; POST on the list appends. An empty list has no
        // index 0 (Caddy answers "out of bounds"), and appending to it is inserting at its head.
        if let Position::Head = position {
            let inserted = self
                .call(Method::PUT, &format!("{routes}/0"), Some(&route))
                .await
                .context("adding the route in Caddy")?;
            if inserted.status.is_success() {
                return Ok(());
            }
        }
        let added = self.call(Method::POST, &routes, Some(&route)).await.context("adding the route in Caddy")?;
        if added.status.is_success() {
            return Ok(());
        }
        anyhow::bail!("Caddy refused the route ({}): {}", added.status, added.text().trim())
    }

    /// Points the application's existing route at `upstream`; `false` when it has no route.
    ///
    /// # Errors
    /// When Caddy cannot be reached or refuses.
    pub async fn repoint(&self, application_id: Uuid, upstream: &str) -> anyhow::Result<bool> {
        let mut repointed = false;
        for id in Self::route_ids(application_id) {
            let answer = self
                .call(Method::PATCH, &format!("/id/{id}/handle/0/upstreams/0/dial"), Some(&json!(upstream)))
                .await
                .context("updating the route's upstream in Caddy")?;
            repointed |= answer.status.is_success();
        }
        Ok(repointed)
    }

    /// The upstream the application's routes point at, if it has any.
    ///
    /// # Errors
    /// When Caddy cannot be reached.
    pub async fn upstream(&self, application_id: Uuid) -> anyhow::Result<Option<String>> {
        Ok(self.routed(application_id).await?.map(|(upstream, _)| upstream))
    }

    /// Where the application's routes point, and the hosts they match; `None` without routes.
    ///
    /// # Errors
    /// When Caddy cannot be reached.
    pub async fn routed(&self, application_id: Uuid) -> anyhow::Result<Option<(String, BTreeSet<String>)>> {
        let mut found: Option<(String, BTreeSet<String>)> = None;
        for id in Self::route_ids(application_id) {
            let answer =
                self.call(Method::GET, &format!("/id/{id}"), None).await.context("reading the route from Caddy")?;
            if !answer.status.is_success() {
                continue;
            }
            let route: serde_json::Value =
                serde_json::from_slice(&answer.body).context("reading the route from Caddy")?;
            let Some(upstream) = route.pointer("/handle/0/upstreams/0/dial").and_then(serde_json::Value::as_str) else {
                continue;
            };
            let hosts = route.pointer("/match/0/host").and_then(serde_json::Value::as_array).into_iter().flatten();
            let (_, all) = found.get_or_insert_with(|| (upstream.to_owned(), BTreeSet::new()));
            all.extend(hosts.filter_map(serde_json::Value::as_str).map(str::to_owned));
        }
        Ok(found)
    }

    /// Removes the application's routes; missing ones are fine.
    ///
    /// # Errors
    /// When Caddy cannot be reached.
    pub async fn remove_route(&self, application_id: Uuid) -> anyhow::Result<()> {
        for id in Self::route_ids(application_id) {
            self.call(Method::DELETE, &format!("/id/{id}"), None).await.context("removing the route in Caddy")?;
        }
        Ok(())
    }

    /// Requests `path` through the proxy with `Host: domain`; returns the status.
    ///
    /// # Errors
    /// When the proxy cannot be reached.
    pub async fn probe(&self, domain: &str, path: &str) -> anyhow::Result<u16> {
        let address = self.client_address();
        let answer =
            self.http.send(Method::GET, &format!("http://{address}{path}"), Some(domain), None).await.with_context(
                || format!("requesting {domain}{path} through the proxy at {address} on {}", self.place),
            )?;
        Ok(answer.status.as_u16())
    }

    /// Where a client on the proxy's machine reaches the server: `:80` means 127.0.0.1:80.
    fn client_address(&self) -> String {
        match self.listen.strip_prefix(':') {
            Some(port) => format!("127.0.0.1:{port}"),
            None => self.listen.replace("0.0.0.0", "127.0.0.1"),
        }
    }
}
