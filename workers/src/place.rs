//! Where applications run: this machine, or a server reached through its pooled SSH
//! connection ([`crate::remote`]). A [`Place`] is the Docker Engine there, the Caddy in front of
//! it, and how that place's loopback ports are reached; [`Places`] makes them on first use and
//! keeps them while a server's link stands.

use crate::docker::{Engine, LABEL_APPLICATION};
use crate::proxy::Proxy;
use crate::remote::{Dial, Link, SshPool};
use crate::ssh::DOCKER_SOCKET;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use uuid::Uuid;
use zpanel_commands::{CommandHandler, Keyring, PgEventStore};
use zpanel_domain::ids::{ServerId, TeamId};

/// Where the engine and the proxy are.
#[derive(Clone, Debug)]
pub struct PlaceConfig {
    /// This machine's Docker Engine (`ZPANEL_DOCKER_HOST`).
    pub docker_host: String,
    /// This machine's Caddy admin API (`ZPANEL_CADDY_ADMIN`).
    pub caddy_admin: String,
    /// Zpanel's server in that Caddy (`ZPANEL_PROXY_LISTEN`).
    pub proxy_listen: String,
    /// Caddy's admin API on servers, as seen there (`ZPANEL_REMOTE_CADDY_ADMIN`).
    pub remote_caddy_admin: String,
    /// Zpanel's server in servers' Caddy (`ZPANEL_REMOTE_PROXY_LISTEN`).
    pub remote_proxy_listen: String,
}

/// One place applications run.
#[derive(Debug)]
pub struct Place {
    /// Its Docker Engine.
    pub engine: Engine,
    /// The Caddy routing domains to its containers.
    pub proxy: Proxy,
    /// How its loopback ports are reached (a container's published port).
    pub dial: Dial,
    /// The server's pooled SSH connection; `None` on this machine.
    pub link: Option<Arc<Link>>,
}

impl Place {
    /// `this machine`, or the server and its address.
    #[must_use]
    pub fn describe(&self) -> String {
        self.link.as_ref().map_or_else(|| "this machine".to_owned(), |link| link.describe())
    }

    /// Stops and removes `application_id`'s containers here except the one named `keep`,
    /// telling `report` each one it stops and what fails. Returns how many it removed.
    pub async fn remove_containers(&self, application_id: Uuid, keep: &str, report: impl Fn(String)) -> usize {
        let application = application_id.to_string();
        let others = match self.engine.containers_labelled(LABEL_APPLICATION, &application).await {
            Ok(found) => found,
            Err(e) => {
                report(format!("could not list the previous containers: {e:#}"));
                return 0;
            }
        };
        let mut removed = 0;
        for old in others.into_iter().filter(|c| c.name != keep) {
            report(format!("stopping the previous container {}", old.name));
            if let Err(e) = self.engine.stop(&old.id, Duration::from_secs(10)).await {
                report(format!("could not stop {}: {e:#}", old.name));
            }
            match self.engine.remove(&old.id).await {
                Ok(()) => removed += 1,
                Err(e) => report(format!("could not remove {}: {e:#}", old.name)),
            }
        }
        removed
    }
}

/// The places of one process, made on first use.
#[derive(Debug)]
pub struct Places {
    config: PlaceConfig,
    ssh: SshPool,
    local: OnceCell<Arc<Place>>,
    remote: Mutex<HashMap<Uuid, Arc<Place>>>,
}

impl Places {
    /// Places reading servers and keys through `handler` and opening keys with `keyring`.
    ///
    /// # Errors
    /// When a proxy address is malformed (refused at start, not at the first deployment).
    pub fn new(
        handler: CommandHandler<PgEventStore>,
        keyring: Arc<Keyring>,
        config: &PlaceConfig,
    ) -> anyhow::Result<Self> {
        Proxy::new(&config.caddy_admin, &config.proxy_listen)?;
        Proxy::new(&config.remote_caddy_admin, &config.remote_proxy_listen)?;
        Ok(Self {
            config: config.clone(),
            ssh: SshPool::new(handler, keyring, crate::servers::SSH_TIMEOUT),
            local: OnceCell::new(),
            remote: Mutex::default(),
        })
    }

    /// Where `team`'s applications on `server` run (`None`: this machine). The engine is
    /// connected on first use (and again after a failed try); a server is reached through its
    /// pooled SSH connection, and a server whose settings changed gets a new one.
    ///
    /// # Errors
    /// When the engine cannot be reached, or the server cannot be used (see [`SshPool::link`]).
    pub async fn get(&self, team: TeamId, server: Option<ServerId>) -> anyhow::Result<Arc<Place>> {
        let config = &self.config;
        let Some(server) = server else {
            let local = self
                .local
                .get_or_try_init(|| async {
                    let engine = Engine::connect(&config.docker_host).await?;
                    let proxy = Proxy::new(&config.caddy_admin, &config.proxy_listen)?;
                    anyhow::Ok(Arc::new(Place { engine, proxy, dial: Dial::local(), link: None }))
                })
                .await?;
            return Ok(Arc::clone(local));
        };
        let server_id = *server.as_uuid();
        let link = self.ssh.link(team, server_id).await?;
        let pooled = self.remote.lock().ok().and_then(|places| places.get(&server_id).cloned());
        if let Some(place) = pooled.filter(|p| p.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link))) {
            return Ok(place);
        }
        let dial = Dial::ssh(Arc::clone(&link));
        let engine = Engine::over(dial.clone().to_socket(DOCKER_SOCKET)).await?;
        let proxy = Proxy::over(&config.remote_caddy_admin, &config.remote_proxy_listen, dial.clone())?;
        let place = Arc::new(Place { engine, proxy, dial, link: Some(link) });
        if let Ok(mut places) = self.remote.lock() {
            places.insert(server_id, Arc::clone(&place));
        }
        Ok(place)
    }
}
