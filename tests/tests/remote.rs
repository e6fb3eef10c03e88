//! Deployments to a remote server: the deploy worker reaches the server's Docker Engine and
//! its Caddy through one pooled SSH connection to a real OpenSSH server (on loopback, reaching
//! this machine's engine), and the application serves through *that* server's proxy.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use zpanel_tests::api::App;
use zpanel_tests::deploy::{Caddy, Repo, Sshd, deployment_log, ensure_base_image, remove_application, until_log_shows};

const ADD_KEY: &str = "mutation($name: String!) { addPrivateKey(input: { name: $name }) { id publicKey } }";
const CREATE_SERVER: &str = "mutation($name: String!, $port: Int!, $key: ID!) {
    createServer(input: { name: $name, host: \"127.0.0.1\", port: $port, user: \"root\", privateKeyId: $key }) { id } }";
const VALIDATE: &str = "mutation($id: ID!) { validateServer(input: { serverId: $id }) { id status } }";
const SERVER_STATUS: &str = "query($id: ID!) { server(id: $id) { status lastError } }";
const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_APP: &str = "mutation($project: ID!, $url: String!, $domain: String!, $server: ID) {
    createApplication(input: { projectId: $project, name: \"web\", gitUrl: $url, gitRef: \"main\",
                               port: 8080, healthCheckPath: \"/\", domains: [$domain], serverId: $server }) { id } }";
const DEPLOY: &str = "mutation($app: ID!) { deployApplication(input: { applicationId: $app }) { id } }";
const DEPLOYMENT: &str = "query($id: ID!) { deployment(id: $id) { id status failedStep failure image } }";

/// A Zpanel whose remote servers' Caddy is `server_caddy` (this machine's is `caddy`), with
/// one team, and an sshd standing for the server.
struct Env {
    app: App,
    token: String,
    caddy: Caddy,
    server_caddy: Caddy,
    sshd: Sshd,
    http: reqwest::Client,
}

impl Env {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Self {
        ensure_base_image();
        let caddy = Caddy::start();
        let server_caddy = Caddy::start();
        let mut env = caddy.env();
        env.push(("ZPANEL_REMOTE_CADDY_ADMIN", server_caddy.admin.as_str()));
        env.push(("ZPANEL_REMOTE_PROXY_LISTEN", server_caddy.listen.as_str()));
        env.extend_from_slice(extra);
        let app = App::start_subcommand("serve", &env).await;
        let token = app.bootstrap("Acme");
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().expect("client");
        Self { app, token, caddy, server_caddy, sshd: Sshd::start(), http }
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.app.graphql(Some(&self.token), query, variables).await.ok()
    }

    /// A server for the sshd, with a key it lets in, validated.
    async fn server(&self) -> String {
        let key = self.gql(ADD_KEY, json!({ "name": "deploy" })).await;
        self.sshd.authorize(key["addPrivateKey"]["publicKey"].as_str().expect("public key"));
        let key_id = key["addPrivateKey"]["id"].as_str().expect("key id");
        let created = self.gql(CREATE_SERVER, json!({ "name": "web-1", "port": self.sshd.port, "key": key_id })).await;
        let server = created["createServer"]["id"].as_str().expect("server id").to_owned();
        self.gql(VALIDATE, json!({ "id": server })).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.gql(SERVER_STATUS, json!({ "id": server })).await["server"].clone();
            match status["status"].as_str() {
                Some("REACHABLE") => return server,
                Some("VALIDATING" | "UNKNOWN") => {}
                _ => panic!("the server did not validate: {status}"),
            }
            assert!(Instant::now() < deadline, "the validation did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create_app(&self, repo: &Repo, domain: &str, server: &str) -> String {
        let project = self.gql(CREATE_PROJECT, json!({ "name": "shop" })).await;
        let project = project["createProject"]["id"].as_str().expect("project");
        let vars = json!({ "project": project, "url": repo.url(), "domain": domain, "server": server });
        self.gql(CREATE_APP, vars).await["createApplication"]["id"].as_str().expect("app").to_owned()
    }

    async fn deploy(&self, application: &str) -> String {
        self.gql(DEPLOY, json!({ "app": application })).await["deployApplication"]["id"]
            .as_str()
            .expect("deployment")
            .to_owned()
    }

    /// Deploys the application and waits until that succeeded (showing its log if not).
    async fn deployed(&self, application: &str) -> String {
        let deployment = self.deploy(application).await;
        let done = self.finished(&deployment).await;
        assert_eq!(done["status"], "SUCCEEDED", "{done}\n{:#?}", self.log(&deployment).await);
        deployment
    }

    async fn finished(&self, deployment: &str) -> Value {
        self.app.finished_deployment(&self.token, DEPLOYMENT, deployment).await
    }

    /// The deployment's log so far, one string per line.
    async fn log(&self, deployment: &str) -> Vec<String> {
        deployment_log(&self.app.db.pool, deployment).await
    }

    /// Polls the log until a line contains `needle`.
    async fn log_shows(&self, deployment: &str, needle: &str) {
        until_log_shows(&self.app.db.pool, deployment, needle).await;
    }

    /// A `containerLogs` subscription to the application's running release.
    async fn container_logs(&self, application: &str) -> zpanel_tests::api::Subscription {
        let query = "subscription($app: ID!) { containerLogs(applicationId: $app, tail: 10) { text } }";
        self.app.subscribe(&self.token, query, json!({ "app": application })).await
    }

    /// `GET /` with `Host: domain` through the Caddy listening at `listen`.
    async fn page(&self, listen: &str, domain: &str) -> Result<(u16, String), String> {
        zpanel_tests::deploy::page(&self.http, listen, domain).await
    }
}

/// The names of the application's containers on the engine.
fn containers(application: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=zpanel.application={application}"))
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn an_application_on_a_remote_server_is_deployed_over_ssh_and_served_by_that_servers_proxy() {
    let mut env = Env::start().await;
    let server = env.server().await;
    let repo = Repo::new("remote v1");
    // It says hello on its output, for `containerLogs`.
    let dockerfile = format!(
        "FROM {}\nCOPY index.html /www/index.html\n\
         CMD [\"sh\", \"-c\", \"echo hello from the server; exec httpd -f -p 8080 -h /www\"]\n",
        zpanel_tests::deploy::BASE_IMAGE
    );
    repo.commit_files(&[("Dockerfile", &dockerfile)], "say hello");
    let application = env.create_app(&repo, "remote.example.test", &server).await;

    let deployment = env.deploy(&application).await;
    let done = env.finished(&deployment).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}\n{:#?}", env.log(&deployment).await);
    let log = env.log(&deployment).await;
    assert!(log.iter().any(|l| l.contains("deploying to server web-1 (127.0.0.1:")), "{log:#?}");

    // The route is in the server's Caddy, not in this machine's.
    let served = env.page(&env.server_caddy.listen, "remote.example.test").await;
    assert!(matches!(&served, Ok((200, body)) if body.contains("remote v1")), "{served:?}");
    let here = env.page(&env.caddy.listen, "remote.example.test").await;
    assert!(!matches!(&here, Ok((200, _))), "this machine's Caddy has no route for it: {here:?}");

    // Its output comes from the server's engine too.
    let mut output = env.container_logs(&application).await;
    let first = output.next_data().await.expect("a container log line");
    assert_eq!(first["containerLogs"]["text"], "hello from the server", "{first}");
    drop(output);

    // Stopping and starting the release goes to the server too; the route follows the new port.
    let stop = "mutation($id: ID!) { stopApplication(input: { id: $id }) { id } }";
    let start = "mutation($id: ID!) { startApplication(input: { id: $id }) { id } }";
    env.gql(stop, json!({ "id": application })).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(env.page(&env.server_caddy.listen, "remote.example.test").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "the stopped release still serves");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.gql(start, json!({ "id": application })).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = env.page(&env.server_caddy.listen, "remote.example.test").await;
        if matches!(&page, Ok((200, body)) if body.contains("remote v1")) {
            break;
        }
        assert!(Instant::now() < deadline, "the started release does not serve: {page:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The logs really come over SSH: with the server unreachable, they cannot be read,
    // though the container runs on (this test's server shares this machine's engine).
    env.sshd.drop_connections();
    env.sshd.stop();
    let mut output = env.container_logs(&application).await;
    let cut = output.next_data().await;
    assert!(cut.is_err(), "logs read without reaching the server: {cut:?}");
    remove_application(&application);
}

#[tokio::test]
async fn a_connection_cut_mid_build_fails_the_deployment_cleanly_and_the_next_one_reconnects() {
    let env = Env::start().await;
    let server = env.server().await;
    let repo = Repo::new("cut v1");
    let application = env.create_app(&repo, "cut.example.test", &server).await;
    let first = env.deploy(&application).await;
    assert_eq!(env.finished(&first).await["status"], "SUCCEEDED");

    // A build that prints, then takes a while: the cut comes while its output streams.
    repo.commit_app("cut v2", "RUN echo build-under-way && sleep 20");
    let second = env.deploy(&application).await;
    env.log_shows(&second, "build-under-way").await;
    assert!(env.sshd.drop_connections() > 0, "sshd had connections to cut");

    let failed = env.finished(&second).await;
    assert_eq!(failed["status"], "FAILED", "{failed}\n{:#?}", env.log(&second).await);
    assert_eq!(failed["failedStep"], "build", "{failed}");
    let failure = failed["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("the SSH connection to server web-1 (127.0.0.1:"), "{failure}");
    // Cleanly: the previous release still serves through the server's proxy, and nothing of
    // the failed deployment is left on the engine.
    let page = env.page(&env.server_caddy.listen, "cut.example.test").await;
    assert!(matches!(&page, Ok((200, body)) if body.contains("cut v1")), "{page:?}");
    let left: Vec<String> = containers(&application);
    assert!(!left.iter().any(|c| c.contains(&second)), "{left:?}");

    // The next deployment connects anew and serves.
    repo.commit_app("cut v3", "");
    let third = env.deploy(&application).await;
    let done = env.finished(&third).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}\n{:#?}", env.log(&third).await);
    let page = env.page(&env.server_caddy.listen, "cut.example.test").await;
    assert!(matches!(&page, Ok((200, body)) if body.contains("cut v3")), "{page:?}");
    remove_application(&application);
}

#[tokio::test]
async fn an_application_that_moves_leaves_the_place_it_ran_before() {
    const MOVE: &str = "mutation($id: ID!, $server: ID, $clear: Boolean) {
        updateApplication(input: { id: $id, serverId: $server, clearServer: $clear }) { id serverId } }";
    let env = Env::start().await;
    let server = env.server().await;
    let repo = Repo::new("moving v1");
    let project = env.gql(CREATE_PROJECT, json!({ "name": "shop" })).await;
    let vars = json!({ "project": project["createProject"]["id"], "url": repo.url(), "domain": "moving.example.test" });
    let application = env.gql(CREATE_APP, vars).await["createApplication"]["id"].as_str().expect("app").to_owned();
    let serves = |listen: String, page: &'static str| {
        let env = &env;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = env.page(&listen, "moving.example.test").await;
                if matches!(&got, Ok((200, body)) if body.contains(page)) {
                    return;
                }
                assert!(Instant::now() < deadline, "{listen} does not serve {page}: {got:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    env.deployed(&application).await;
    serves(env.caddy.listen.clone(), "moving v1").await;
    let local = containers(&application);
    assert_eq!(local.len(), 1, "{local:?}");

    // Onto the server: it serves there, and this machine's route and container are gone.
    env.gql(MOVE, json!({ "id": application, "server": server })).await;
    repo.commit_app("moving v2", "");
    let second = env.deployed(&application).await;
    serves(env.server_caddy.listen.clone(), "moving v2").await;
    let here = env.page(&env.caddy.listen, "moving.example.test").await;
    assert!(!matches!(&here, Ok((200, body)) if body.contains("moving")), "this machine still routes it: {here:?}");
    let log = env.log(&second).await;
    assert!(
        log.iter().any(|l| l.contains("the application moved: removing the previous release from this machine")),
        "{log:#?}"
    );
    let now = containers(&application);
    assert!(now.len() == 1 && now != local, "only the new release runs: {now:?}, before {local:?}");

    // And back off it: the server's route goes.
    env.gql(MOVE, json!({ "id": application, "clear": true })).await;
    repo.commit_app("moving v3", "");
    let third = env.deployed(&application).await;
    serves(env.caddy.listen.clone(), "moving v3").await;
    let there = env.page(&env.server_caddy.listen, "moving.example.test").await;
    assert!(!matches!(&there, Ok((200, body)) if body.contains("moving")), "the server still routes it: {there:?}");
    let log = env.log(&third).await;
    assert!(log.iter().any(|l| l.contains("removing the previous release from server web-1 (127.0.0.1:")), "{log:#?}");
    assert_eq!(containers(&application).len(), 1);
    remove_application(&application);
}

#[tokio::test]
async fn the_route_repair_takes_a_moved_application_off_a_server_the_move_could_not_reach() {
    let mut env = Env::start_with(&[("ZPANEL_ROUTE_SYNC_SECONDS", "1")]).await;
    let server = env.server().await;
    let repo = Repo::new("stranded v1");
    let application = env.create_app(&repo, "stranded.example.test", &server).await;
    env.deployed(&application).await;

    // The server is cut off while the application moves back to this machine: the move
    // succeeds, but cannot take the old release off the server.
    env.sshd.drop_connections();
    env.sshd.stop();
    let clear = "mutation($id: ID!) { updateApplication(input: { id: $id, clearServer: true }) { id } }";
    env.gql(clear, json!({ "id": application })).await;
    repo.commit_app("stranded v2", "");
    let second = env.deployed(&application).await;
    let log = env.log(&second).await;
    assert!(log.iter().any(|l| l.contains("could not remove the route on server web-1")), "{log:#?}");
    let here = env.page(&env.caddy.listen, "stranded.example.test").await;
    assert!(matches!(&here, Ok((200, body)) if body.contains("stranded v2")), "{here:?}");
    // The server's Caddy still routes the domain. (To a container already gone: this test's
    // server shares this machine's engine, where the new release's clean-up removed it.)
    let routed = |page: &Result<(u16, String), String>| {
        matches!(page, Ok((502, _))) || matches!(page, Ok((200, body)) if body.contains("stranded"))
    };
    let there = env.page(&env.server_caddy.listen, "stranded.example.test").await;
    assert!(routed(&there), "the server's Caddy still routes it: {there:?}");

    // Once the server is back, the periodic repair takes the application off it.
    env.sshd.resume();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let there = env.page(&env.server_caddy.listen, "stranded.example.test").await;
        let stale = containers(&application).len();
        if !routed(&there) && stale == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the server still routes it ({there:?}) or runs {stale} containers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let here = env.page(&env.caddy.listen, "stranded.example.test").await;
    assert!(matches!(&here, Ok((200, body)) if body.contains("stranded v2")), "this machine still serves: {here:?}");
    remove_application(&application);
}
