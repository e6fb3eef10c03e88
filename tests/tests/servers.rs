//! Servers end to end: `validateServer` makes the server worker (in `zpanel serve`) connect to a
//! real OpenSSH server over SSH, trust its host key on first use, and look around — the OS,
//! CPUs, memory, free disk and the Docker Engine's version through the engine's socket.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use zpanel_tests::api::App;
use zpanel_tests::deploy::Sshd;

const ADD_KEY: &str = "mutation($name: String!) { addPrivateKey(input: { name: $name }) { id publicKey fingerprint } }";
const CREATE_SERVER: &str = "mutation($name: String!, $port: Int!, $key: ID!) {
    createServer(input: { name: $name, host: \"127.0.0.1\", port: $port, user: \"root\", privateKeyId: $key }) { id status } }";
const VALIDATE: &str = "mutation($id: ID!) { validateServer(input: { serverId: $id }) { id status } }";
const SERVER: &str = "query($id: ID!) { server(id: $id) {
    status lastError hostKeyFingerprint facts { os dockerVersion cpus memoryBytes diskFreeBytes warnings } } }";

/// A Zpanel with one team, and an sshd on loopback.
struct Env {
    app: App,
    token: String,
    sshd: Sshd,
}

impl Env {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(env: &[(&str, &str)]) -> Self {
        let app = App::start_with(env).await;
        let token = app.bootstrap("ops");
        Self { app, token, sshd: Sshd::start() }
    }

    /// Polls the server until its status is `status` (60 s at most); returns it then.
    async fn until_status(&self, server_id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let server = self.gql(SERVER, json!({ "id": server_id })).await["server"].clone();
            if server["status"] == status {
                return server;
            }
            assert!(Instant::now() < deadline, "the server did not become {status}: {server}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's event types, oldest first.
    async fn event_types(&self, server_id: &str) -> Vec<String> {
        let events = self
            .gql("query($s: ID!) { events(streamId: $s) { eventType } }", json!({ "s": format!("server-{server_id}") }))
            .await;
        events["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["eventType"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.app.graphql(Some(&self.token), query, variables).await.ok()
    }

    /// A new Ed25519 key of the team: its id and public half.
    async fn key(&self, name: &str) -> (String, String) {
        let key = self.gql(ADD_KEY, json!({ "name": name })).await;
        let key = &key["addPrivateKey"];
        (key["id"].as_str().expect("key id").to_owned(), key["publicKey"].as_str().expect("public key").to_owned())
    }

    async fn server(&self, name: &str, key_id: &str) -> String {
        let created = self.gql(CREATE_SERVER, json!({ "name": name, "port": self.sshd.port, "key": key_id })).await;
        assert_eq!(created["createServer"]["status"], "UNKNOWN", "{created}");
        created["createServer"]["id"].as_str().expect("server id").to_owned()
    }

    /// Asks for a validation and waits for its result.
    async fn validate(&self, server_id: &str) -> Value {
        let asked = self.gql(VALIDATE, json!({ "id": server_id })).await;
        assert_eq!(asked["validateServer"]["status"], "VALIDATING", "{asked}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let server = self.gql(SERVER, json!({ "id": server_id })).await["server"].clone();
            if server["status"] != "VALIDATING" {
                return server;
            }
            assert!(Instant::now() < deadline, "the validation did not finish: {server}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn last_error(server: &Value) -> &str {
    server["lastError"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_server_with_the_key_installed_is_reachable_and_its_facts_and_host_key_are_recorded() {
    let env = Env::start().await;
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    let server_id = env.server("local", &key_id).await;

    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "REACHABLE", "{server}");
    assert_eq!(server["lastError"], Value::Null, "{server}");
    assert_eq!(server["hostKeyFingerprint"], env.sshd.host_key_fingerprint(), "{server}");
    let facts = &server["facts"];
    assert!(
        facts["dockerVersion"].as_str().is_some_and(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit())),
        "{facts}"
    );
    assert!(facts["os"].as_str().is_some_and(|os| !os.is_empty() && os != "unknown"), "{facts}");
    assert!(facts["cpus"].as_u64().is_some_and(|n| n >= 1), "{facts}");
    assert!(facts["memoryBytes"].as_u64().is_some_and(|n| n > 64 << 20), "{facts}");
    assert!(facts["diskFreeBytes"].as_u64().is_some_and(|n| n > 0), "{facts}");
    // An engine older than 24 is named in a warning; a current one gets none. (This machine's
    // engine decides which; the rule itself has unit tests in the domain.)
    let version = facts["dockerVersion"].as_str().unwrap_or_default();
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).expect("a numeric major version");
    let warnings = facts["warnings"].as_array().expect("warnings");
    if major < 24 {
        assert!(warnings.len() == 1 && warnings[0].as_str().is_some_and(|w| w.contains(version)), "{facts}");
    } else {
        assert!(warnings.is_empty(), "{facts}");
    }
    let asked = env
        .gql(
            "query($id: ID!) { serverFacts(serverId: $id) { os dockerVersion cpus memoryBytes diskFreeBytes warnings } }",
            json!({ "id": server_id }),
        )
        .await;
    assert_eq!(&asked["serverFacts"], facts);

    // Again: the recorded host key is the one expected now, and it matches.
    let again = env.validate(&server_id).await;
    assert_eq!(again["status"], "REACHABLE", "{again}");
    assert_eq!(again["hostKeyFingerprint"], server["hostKeyFingerprint"]);
}

#[tokio::test]
async fn a_key_the_server_does_not_know_is_refused_with_a_reason_naming_it() {
    let env = Env::start().await;
    let (installed, installed_public) = env.key("installed").await;
    env.sshd.authorize(&installed_public);
    let (stranger, _) = env.key("stranger").await;
    let server_id = env.server("local", &stranger).await;

    // Never validated: the reason covers every way a first login fails (what exactly failed
    // would tell what listens at the address), and names the key and where it belongs.
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "UNREACHABLE", "{server}");
    let error = last_error(&server);
    assert!(error.contains("could not log in as root"), "{error}");
    assert!(error.contains("SHA256:") && error.contains("authorized_keys"), "{error}");
    assert_eq!(server["facts"], Value::Null, "{server}");
    assert_ne!(installed, stranger);
}

#[tokio::test]
async fn a_host_key_that_changed_after_first_use_is_refused_naming_both_fingerprints() {
    let mut env = Env::start().await;
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    let server_id = env.server("local", &key_id).await;
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");
    let trusted = env.sshd.host_key_fingerprint();

    env.sshd.replace_host_key();
    let presented = env.sshd.host_key_fingerprint();
    assert_ne!(trusted, presented);
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "UNREACHABLE", "{server}");
    let error = last_error(&server);
    assert!(error.contains("host key") && error.contains("changed"), "{error}");
    assert!(error.contains(&trusted) && error.contains(&presented), "both fingerprints are named: {error}");
    // Never silently accepted: the trusted key stays the recorded one.
    assert_eq!(server["hostKeyFingerprint"], trusted.as_str(), "{server}");
}

#[tokio::test]
async fn a_stopped_sshd_makes_the_server_unreachable_with_connection_refused_until_it_is_back() {
    let mut env = Env::start().await;
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    let server_id = env.server("local", &key_id).await;
    // Once logged in to, the server is the team's: its failures are told in detail.
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");

    env.sshd.stop();
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "UNREACHABLE", "{server}");
    assert!(last_error(&server).contains("connection refused"), "{server}");

    env.sshd.resume();
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "REACHABLE", "{server}");
    assert_eq!(server["lastError"], Value::Null, "{server}");
}

#[tokio::test]
async fn the_periodic_check_records_when_a_server_goes_down_and_when_it_is_back() {
    let mut env = Env::start_with(&[("ZPANEL_SERVER_CHECK_SECONDS", "1")]).await;
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    let server_id = env.server("local", &key_id).await;
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");

    env.sshd.stop();
    let server = env.until_status(&server_id, "UNREACHABLE").await;
    assert!(last_error(&server).contains("connection refused"), "{server}");
    env.sshd.resume();
    let server = env.until_status(&server_id, "REACHABLE").await;
    assert_eq!(server["lastError"], Value::Null, "{server}");
    // Each change once, in order; the checks in between (every second) added nothing.
    let types = env.event_types(&server_id).await;
    let changes: Vec<&str> = types
        .iter()
        .map(String::as_str)
        .filter(|t| matches!(*t, "ServerBecameUnreachable" | "ServerRecovered"))
        .collect();
    assert_eq!(changes, ["ServerBecameUnreachable", "ServerRecovered"], "{types:?}");
}

#[tokio::test]
async fn run_server_check_checks_at_once_and_only_a_validated_server() {
    let mut env = Env::start_with(&[("ZPANEL_SERVER_CHECK_SECONDS", "0")]).await;
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    let server_id = env.server("local", &key_id).await;
    const CHECK: &str = "mutation($id: ID!) { runServerCheck(input: { serverId: $id }) { id status } }";
    let early = env.app.graphql(Some(&env.token), CHECK, json!({ "id": server_id })).await;
    assert_eq!(early.code(), "CONFLICT", "{:?}", early.errors);
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");

    env.sshd.stop();
    let asked = env.gql(CHECK, json!({ "id": server_id })).await;
    // The answer is the server as it stands when answered: the check runs in the worker, which
    // may already have found the server down by then (the connection is refused at once).
    assert_eq!(asked["runServerCheck"]["id"], server_id.as_str(), "{asked}");
    assert!(matches!(asked["runServerCheck"]["status"].as_str(), Some("REACHABLE" | "UNREACHABLE")), "{asked}");
    let server = env.until_status(&server_id, "UNREACHABLE").await;
    assert!(last_error(&server).contains("connection refused"), "{server}");
    assert!(env.event_types(&server_id).await.iter().any(|t| t == "ServerCheckRequested"));
    env.sshd.resume();
    env.gql(CHECK, json!({ "id": server_id })).await;
    env.until_status(&server_id, "REACHABLE").await;
}

#[tokio::test]
async fn a_server_behind_a_jump_host_is_reached_through_it_and_both_host_keys_are_recorded() {
    let env = Env::start_with(&[("ZPANEL_SERVER_CHECK_SECONDS", "0")]).await;
    let mut bastion = Sshd::start();
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    bastion.authorize(&public_key);
    let create = "mutation($port: Int!, $jump: Int!, $key: ID!) {
        createServer(input: { name: \"inner\", host: \"127.0.0.1\", port: $port, user: \"root\", privateKeyId: $key,
                              jumpHost: { host: \"127.0.0.1\", port: $jump } }) { id jumpHost { host port user } } }";
    let created = env.gql(create, json!({ "port": env.sshd.port, "jump": bastion.port, "key": key_id })).await;
    let server_id = created["createServer"]["id"].as_str().expect("server id").to_owned();
    let jump = &created["createServer"]["jumpHost"];
    assert_eq!(*jump, json!({ "host": "127.0.0.1", "port": bastion.port, "user": "root" }));

    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "REACHABLE", "{server}");
    assert_eq!(server["hostKeyFingerprint"], env.sshd.host_key_fingerprint(), "the server's own key");
    let keys =
        env.gql("query($id: ID!) { server(id: $id) { jumpHostKeyFingerprint } }", json!({ "id": server_id })).await;
    assert_eq!(keys["server"]["jumpHostKeyFingerprint"], bastion.host_key_fingerprint(), "the bastion's key");

    // The way in is the bastion: without it, the server cannot be reached, though it runs.
    bastion.stop();
    const CHECK: &str = "mutation($id: ID!) { runServerCheck(input: { serverId: $id }) { id } }";
    env.gql(CHECK, json!({ "id": server_id })).await;
    let server = env.until_status(&server_id, "UNREACHABLE").await;
    let refused_by = format!("connection refused by 127.0.0.1:{}", bastion.port);
    assert!(last_error(&server).contains(&refused_by), "{server}");
    bastion.resume();
    env.gql(CHECK, json!({ "id": server_id })).await;
    env.until_status(&server_id, "REACHABLE").await;

    // A bad jump host is refused naming its field, and nothing is created.
    let bad = "mutation($key: ID!) { createServer(input: { name: \"bad\", host: \"127.0.0.1\", privateKeyId: $key,
        jumpHost: { host: \"-oProxyCommand=x\" } }) { id } }";
    let refused = env.app.graphql(Some(&env.token), bad, json!({ "key": key_id })).await;
    assert_eq!(refused.code(), "INVALID_INPUT", "{:?}", refused.errors);
    assert_eq!(refused.error()["extensions"]["field"], "jumpHost.host", "{:?}", refused.errors);
    let servers = env.gql("{ servers { name } }", json!({})).await;
    assert_eq!(servers["servers"].as_array().map(Vec::len), Some(1), "{servers}");
}

#[tokio::test]
async fn an_imported_rsa_key_logs_in() {
    let env = Env::start().await;
    let dir = zpanel_tests::TempDir::new();
    let path = dir.0.join("id_rsa");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "3072", "-N", "", "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen");
    assert!(made.success());
    let pem = std::fs::read_to_string(&path).expect("the private key");
    let import =
        "mutation($pem: String!) { addPrivateKey(input: { name: \"rsa\", privateKey: $pem }) { id publicKey } }";
    let key = env.gql(import, json!({ "pem": pem })).await;
    let key = &key["addPrivateKey"];
    assert!(key["publicKey"].as_str().is_some_and(|k| k.starts_with("ssh-rsa ")), "{key}");
    env.sshd.authorize(key["publicKey"].as_str().expect("public key"));
    let server_id = env.server("rsa", key["id"].as_str().expect("key id")).await;
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "REACHABLE", "{server}");
}

#[tokio::test]
async fn a_passphrase_protected_key_is_imported_with_its_passphrase_and_logs_in() {
    const PASSPHRASE: &str = "correct horse battery";
    let env = Env::start().await;
    let dir = zpanel_tests::TempDir::new();
    let path = dir.0.join("id_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", PASSPHRASE, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen");
    assert!(made.success());
    let pem = std::fs::read_to_string(&path).expect("the private key");
    let import = "mutation($pem: String!, $passphrase: String) {
        addPrivateKey(input: { name: \"protected\", privateKey: $pem, passphrase: $passphrase }) { id publicKey } }";
    for (given, rule) in [(None, "is required"), (Some("wrong horse"), "does not open the key")] {
        let refused = env.app.graphql(Some(&env.token), import, json!({ "pem": pem, "passphrase": given })).await;
        assert_eq!(refused.code(), "INVALID_INPUT", "{:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "passphrase");
        let message = refused.error()["message"].as_str().unwrap_or_default();
        assert!(message.contains(rule) && !message.contains("horse"), "{message}");
    }
    assert_eq!(env.gql("{ privateKeys { id } }", json!({})).await["privateKeys"], json!([]), "nothing was added");

    let key = env.gql(import, json!({ "pem": pem, "passphrase": PASSPHRASE })).await;
    let key = &key["addPrivateKey"];
    let key_id = key["id"].as_str().expect("key id");
    env.sshd.authorize(key["publicKey"].as_str().expect("public key"));
    let server_id = env.server("protected", key_id).await;
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");
    // The passphrase is nowhere in the key's history.
    let events = env
        .gql("query($s: ID!) { events(streamId: $s) { payload } }", json!({ "s": format!("private_key-{key_id}") }))
        .await;
    assert!(events["events"].as_array().is_some_and(|e| !e.is_empty()), "{events}");
    assert!(!events.to_string().contains(PASSPHRASE), "{events}");
}

/// The SSH client itself, without the worker: a server with no Docker Engine, a port that never
/// answers.
mod ssh {
    use std::time::Duration;
    use zpanel_tests::deploy::Sshd;
    use zpanel_workers::ssh::{SshError, SshSession, SshTarget, parse_private_key};

    fn root_at(port: u16) -> SshTarget {
        SshTarget { host: "127.0.0.1".into(), port, user: "root".into() }
    }

    #[tokio::test]
    async fn an_engine_socket_that_is_not_there_is_reported_as_docker_missing() {
        let sshd = Sshd::start();
        let material = zpanel_commands::ssh_keys::generate_ed25519().expect("a key");
        sshd.authorize(&material.public_key);
        let key = parse_private_key(material.private_key.expose()).expect("parses");
        let session =
            SshSession::connect(&root_at(sshd.port), key, None, Duration::from_secs(10)).await.expect("connects");
        assert_eq!(session.host_key_fingerprint(), sshd.host_key_fingerprint());
        let missing = session.docker_version("/nonexistent/docker.sock").await.expect_err("no engine there");
        assert!(matches!(missing, SshError::DockerMissing { .. }), "{missing:?}");
        let message = missing.to_string();
        assert!(message.contains("Docker Engine is not reachable at /nonexistent/docker.sock"), "{message}");
        // The connection outlives a failed channel: the real socket still answers on it.
        assert!(!session.docker_version(zpanel_workers::ssh::DOCKER_SOCKET).await.expect("engine").is_empty());
        session.close().await;
    }

    #[tokio::test]
    async fn a_port_that_accepts_but_never_speaks_ssh_times_out() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let port = silent.local_addr().expect("address").port();
        let holding = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let material = zpanel_commands::ssh_keys::generate_ed25519().expect("a key");
        let key = parse_private_key(material.private_key.expose()).expect("parses");
        let started = std::time::Instant::now();
        let err = SshSession::connect(&root_at(port), key, None, Duration::from_secs(1)).await.expect_err("times out");
        assert!(matches!(err, SshError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("no answer from 127.0.0.1"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        holding.abort();
    }
}

#[tokio::test]
async fn a_server_is_renamed_moved_and_removed_and_a_key_in_use_is_kept() {
    const UPDATE: &str = "mutation($input: UpdateServerInput!) { updateServer(input: $input) {
        id name port version hostKeyFingerprint facts { os } jumpHost { host } } }";
    const REMOVE_SERVER: &str =
        "mutation($id: ID!, $c: ID) { removeServer(input: { id: $id, commandId: $c }) { id name port } }";
    const REMOVE_KEY: &str = "mutation($id: ID!) { removePrivateKey(input: { id: $id }) { id name fingerprint } }";
    let env = Env::start().await;
    let elsewhere = Sshd::start();
    let (key_id, public_key) = env.key("ops key").await;
    env.sshd.authorize(&public_key);
    elsewhere.authorize(&public_key);
    let server_id = env.server("db-1", &key_id).await;
    env.server("db-3", &key_id).await;
    let first = env.validate(&server_id).await;
    assert_eq!(first["status"], "REACHABLE", "{first}");

    // A new name keeps what was learnt of the machine.
    let renamed =
        env.gql(UPDATE, json!({ "input": { "id": server_id, "name": "db-2" } })).await["updateServer"].clone();
    assert_eq!(renamed["name"], "db-2");
    assert_eq!(renamed["hostKeyFingerprint"], env.sshd.host_key_fingerprint(), "{renamed}");
    assert!(renamed["facts"]["os"].is_string(), "{renamed}");

    // Bad input is refused naming the field, and changes nothing.
    for (input, code, field) in [
        (json!({ "id": server_id, "port": 0 }), "INVALID_INPUT", Some("port")),
        (json!({ "id": server_id, "host": "-oProxyCommand=x" }), "INVALID_INPUT", Some("host")),
        (json!({ "id": server_id, "user": "root;id" }), "INVALID_INPUT", Some("user")),
        (json!({ "id": server_id, "privateKeyId": server_id }), "INVALID_INPUT", Some("privateKeyId")),
        (json!({ "id": server_id }), "INVALID_INPUT", Some("input")),
        (
            json!({ "id": server_id, "jumpHost": { "host": "127.0.0.1" }, "clearJumpHost": true }),
            "INVALID_INPUT",
            Some("clearJumpHost"),
        ),
        (json!({ "id": server_id, "name": "db-3" }), "CONFLICT", None),
    ] {
        let refused = env.app.graphql(Some(&env.token), UPDATE, json!({ "input": input })).await;
        assert_eq!(refused.code(), code, "{input}: {:?}", refused.errors);
        if let Some(field) = field {
            assert_eq!(refused.error()["extensions"]["field"], field, "{input}");
        }
    }
    let unchanged = env.gql(SERVER, json!({ "id": server_id })).await;
    assert_eq!(unchanged["server"]["hostKeyFingerprint"], env.sshd.host_key_fingerprint());

    // Another port may be another machine: its host key and facts are forgotten until validated.
    let moved =
        env.gql(UPDATE, json!({ "input": { "id": server_id, "port": elsewhere.port } })).await["updateServer"].clone();
    assert_eq!(moved["port"], elsewhere.port);
    assert_eq!(moved["hostKeyFingerprint"], Value::Null, "{moved}");
    assert_eq!(moved["facts"], Value::Null, "{moved}");
    let server = env.validate(&server_id).await;
    assert_eq!(server["status"], "REACHABLE", "{server}");
    assert_eq!(server["hostKeyFingerprint"], elsewhere.host_key_fingerprint(), "the other machine's key");
    let types = env.event_types(&server_id).await;
    assert!(types.contains(&"ServerRenamed".to_owned()) && types.contains(&"ServerConnectionChanged".to_owned()));

    // In use: an application deploys to the server and clones with the key. Both removals are
    // refused naming who uses them.
    let project = env.gql("mutation { createProject(input: { name: \"shop\" }) { id } }", json!({})).await;
    let project = project["createProject"]["id"].as_str().expect("project").to_owned();
    let create_app = "mutation($p: ID!, $name: String!, $s: ID, $k: ID) {
        createApplication(input: { projectId: $p, name: $name, gitUrl: \"git@git.example.com:acme/shop.git\", serverId: $s, deployKeyId: $k }) { id } }";
    let on_server = env.gql(create_app, json!({ "p": project, "name": "web", "s": server_id })).await;
    let on_server = on_server["createApplication"]["id"].as_str().expect("app").to_owned();
    let cloner = env.gql(create_app, json!({ "p": project, "name": "site", "k": key_id })).await;
    let cloner = cloner["createApplication"]["id"].as_str().expect("app").to_owned();
    let refused = env.app.graphql(Some(&env.token), REMOVE_SERVER, json!({ "id": server_id })).await;
    assert_eq!(refused.code(), "CONFLICT");
    assert!(
        refused.error()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("applications still deploy to the server: web"),
        "{:?}",
        refused.errors
    );
    let refused = env.app.graphql(Some(&env.token), REMOVE_KEY, json!({ "id": key_id })).await;
    assert_eq!(refused.code(), "CONFLICT");
    let why = refused.error()["message"].as_str().unwrap_or_default().to_owned();
    assert!(why.contains("servers db-2, db-3 log in with it") && why.contains("applications site clone"), "{why}");

    // Archived, the application no longer holds the server; it goes, answered as it was.
    let archive = "mutation($id: ID!) { archiveApplication(input: { id: $id }) { id } }";
    env.gql(archive, json!({ "id": on_server })).await;
    let command = uuid::Uuid::now_v7().to_string();
    let removed = env.gql(REMOVE_SERVER, json!({ "id": server_id, "c": command })).await;
    assert_eq!(removed["removeServer"], json!({ "id": server_id, "name": "db-2", "port": elsewhere.port }));
    let again = env.gql(REMOVE_SERVER, json!({ "id": server_id, "c": command })).await;
    assert_eq!(again, removed, "a retry with its command id answers the same");
    let gone = env.gql(SERVER, json!({ "id": server_id })).await;
    assert_eq!(gone["server"], Value::Null);
    assert_eq!(env.event_types(&server_id).await.last().map(String::as_str), Some("ServerRemoved"));
    let refused = env.app.graphql(Some(&env.token), REMOVE_SERVER, json!({ "id": server_id })).await;
    assert_eq!(refused.code(), "NOT_FOUND", "removed once");

    // The key goes once nothing uses it; its sealed half with it.
    let servers = env.gql("{ servers { id } }", json!({})).await;
    for server in servers["servers"].as_array().expect("servers") {
        env.gql(REMOVE_SERVER, json!({ "id": server["id"] })).await;
    }
    env.gql(archive, json!({ "id": cloner })).await;
    let removed = env.gql(REMOVE_KEY, json!({ "id": key_id })).await;
    assert_eq!(removed["removePrivateKey"]["name"], "ops key");
    assert!(removed["removePrivateKey"]["fingerprint"].as_str().is_some_and(|f| f.starts_with("SHA256:")));
    assert_eq!(env.gql("{ privateKeys { id } }", json!({})).await["privateKeys"], json!([]));
}
