//! Tenancy on a shared installation, in the attacker's shoes (issue 17): domains are unique
//! across teams and routed most specific first; the control plane's host and public suffixes
//! cannot be claimed; a `write` token cannot point an application at other code or another
//! server; a key file cannot pin the API's threads; and `validateServer` is no port scanner.

use futures::future::join_all;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use zpanel_tests::api::App;
use zpanel_tests::deploy::{Caddy, Repo, ensure_base_image, page, remove_application};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_IMAGE_APP: &str = "mutation($project: ID!, $name: String!, $domains: [String!]!) {
    createApplication(input: { projectId: $project, name: $name, image: \"nginx:1.27\", domains: $domains }) {
        id version domains } }";
const CREATE_GIT_APP: &str = "mutation($project: ID!, $name: String!, $url: String!, $domains: [String!]!) {
    createApplication(input: { projectId: $project, name: $name, gitUrl: $url, port: 8080, domains: $domains }) {
        id } }";
const SET_DOMAINS: &str = "mutation($id: ID!, $domains: [String!]!) {
    updateApplication(input: { id: $id, domains: $domains }) { id version domains } }";
const APPLICATION: &str = "query($id: ID!) { application(id: $id) { version domains gitUrl image serverId deployKeyId
    limits { memoryBytes cpuMillis } healthCheck { path intervalSecs timeoutSecs retries startPeriodSecs } } }";
const CREATE_TOKEN: &str = "mutation($abilities: [String!]!) {
    createApiToken(input: { name: \"t\", abilities: $abilities }) { token } }";

async fn project(app: &App, token: &str) -> String {
    let data = app.graphql(Some(token), CREATE_PROJECT, json!({ "name": "shop" })).await.ok();
    data["createProject"]["id"].as_str().expect("project id").to_owned()
}

/// Creates an image application with `domains`; the raw answer.
async fn claim(app: &App, token: &str, project: &str, name: &str, domains: &[&str]) -> zpanel_tests::api::Answer {
    app.graphql(Some(token), CREATE_IMAGE_APP, json!({ "project": project, "name": name, "domains": domains })).await
}

async fn token(app: &App, root: &str, abilities: &[&str]) -> String {
    let data = app.graphql(Some(root), CREATE_TOKEN, json!({ "abilities": abilities })).await.ok();
    data["createApiToken"]["token"].as_str().expect("a token").to_owned()
}

/// Asserts `answer` is a `CONFLICT` that names `domain`.
fn assert_taken(answer: &zpanel_tests::api::Answer, domain: &str) {
    assert_eq!(answer.code(), "CONFLICT", "{domain}: {:?}", answer.errors);
    let message = answer.error()["message"].as_str().unwrap_or_default();
    assert!(message.contains(domain), "the error names {domain}: {message}");
}

#[tokio::test]
async fn another_team_can_claim_neither_a_domain_nor_a_wildcard_over_it_nor_a_host_under_its_wildcard() {
    let app = App::start_api().await;
    let a = app.bootstrap("Team A");
    let b = app.bootstrap("Team B");
    let (pa, pb) = (project(&app, &a).await, project(&app, &b).await);
    let shop = claim(&app, &a, &pa, "shop", &["shop.example.com"]).await.ok();
    let shop = shop["createApplication"]["id"].as_str().expect("id").to_owned();
    claim(&app, &b, &pb, "catchall", &["*.b-corp.com"]).await.ok();

    // B: A's exact host, and a wildcard covering it, on create and on update.
    assert_taken(&claim(&app, &b, &pb, "evil", &["shop.example.com"]).await, "shop.example.com");
    assert_taken(&claim(&app, &b, &pb, "evil", &["*.example.com"]).await, "*.example.com");
    let decoy = claim(&app, &b, &pb, "decoy", &["decoy.b-corp.org"]).await.ok();
    let decoy = decoy["createApplication"]["id"].as_str().expect("id").to_owned();
    for grab in [["shop.example.com"], ["*.example.com"]] {
        let refused = app.graphql(Some(&b), SET_DOMAINS, json!({ "id": decoy, "domains": grab })).await;
        assert_taken(&refused, grab[0]);
    }
    let unchanged = app.graphql(Some(&b), APPLICATION, json!({ "id": decoy })).await.ok();
    assert_eq!(unchanged["application"]["version"], 1, "nothing changed: {unchanged}");
    assert_eq!(unchanged["application"]["domains"], json!(["decoy.b-corp.org"]));
    // A: a host under B's wildcard.
    let refused = app.graphql(Some(&a), SET_DOMAINS, json!({ "id": shop, "domains": ["x.b-corp.com"] })).await;
    assert_taken(&refused, "x.b-corp.com");
    // Nor, within one team, one name for two applications; a wildcard over the team's own
    // host is fine (the host is routed first).
    assert_taken(&claim(&app, &a, &pa, "twin", &["shop.example.com"]).await, "shop.example.com");
    claim(&app, &a, &pa, "rest", &["*.example.com"]).await.ok();
    // Neither team sees which application holds a name: only the name asked for.
    let names = app.graphql(Some(&b), "{ applications { nodes { name domains } } }", json!({})).await.ok();
    assert_eq!(names["applications"]["nodes"].as_array().map(Vec::len), Some(2), "{names}");

    // Archived, an application releases its domains: then they are anyone's.
    let kept = claim(&app, &a, &pa, "old", &["old.example.org"]).await.ok();
    let old = kept["createApplication"]["id"].as_str().expect("id").to_owned();
    assert_taken(&claim(&app, &b, &pb, "new", &["old.example.org"]).await, "old.example.org");
    let archive = "mutation($id: ID!) { archiveApplication(input: { id: $id }) { id } }";
    app.graphql(Some(&a), archive, json!({ "id": old })).await.ok();
    claim(&app, &b, &pb, "new", &["old.example.org"]).await.ok();
}

#[tokio::test]
async fn a_wildcard_at_a_public_suffix_and_the_control_planes_own_host_cannot_be_claimed() {
    let app = App::start_subcommand("api", &[("ZPANEL_PUBLIC_HOST", "zpanel.example.net,127.0.0.1")]).await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root).await;
    for refused in ["*.com", "*.co.uk", "*.github.io", "zpanel.example.net", "*.example.net"] {
        let answer = claim(&app, &root, &project, "web", &["fine.example.org", refused]).await;
        assert_eq!(answer.code(), "INVALID_INPUT", "{refused}: {:?}", answer.errors);
        assert_eq!(answer.error()["extensions"]["field"], "domains", "{refused}");
    }
    let none = app.graphql(Some(&root), "{ applications { totalCount } }", json!({})).await.ok();
    assert_eq!(none["applications"]["totalCount"], 0, "nothing was created: {none}");
    // One label deeper is a registrable name's: fine.
    claim(&app, &root, &project, "web", &["*.shop.co.uk", "api.zpanel.example.net"]).await.ok();
}

#[tokio::test]
async fn of_teams_claiming_one_domain_at_once_exactly_one_wins() {
    let app = App::start_api().await;
    let mut teams = Vec::new();
    for n in 0..6 {
        let token = app.bootstrap(&format!("Team {n}"));
        let project = project(&app, &token).await;
        teams.push((token, project));
    }
    for (round, domains) in
        [["race.example.com", "race.example.com"], ["*.wild.example.com", "a.wild.example.com"]].into_iter().enumerate()
    {
        // Half the teams ask for one name, half for the other; in the second round the names
        // overlap (a wildcard and a host under it), so still only one team may win.
        let app = &app;
        let claims = teams.iter().enumerate().map(|(n, (token, project))| {
            let domain = domains[n % 2];
            async move { claim(app, token, project, &format!("r{round}"), &[domain]).await }
        });
        let answers = join_all(claims).await;
        let won = answers.iter().filter(|a| a.errors.is_empty()).count();
        let taken = answers.iter().filter(|a| !a.errors.is_empty() && a.code() == "CONFLICT").count();
        assert_eq!((won, taken), (1, teams.len() - 1), "round {round}: {answers:?}");
    }
}

#[tokio::test]
async fn a_write_token_cannot_point_an_application_at_other_code_or_another_server() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root).await;
    let create = "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\",
        gitUrl: \"https://git.example.com/acme/web.git\" }) { id } }";
    let web = app.graphql(Some(&root), create, json!({ "p": project })).await.ok()["createApplication"]["id"].clone();
    let key = app.graphql(Some(&root), "mutation { addPrivateKey(input: { name: \"k\" }) { id } }", json!({})).await;
    let key = key.ok()["addPrivateKey"]["id"].clone();
    let server = app
        .graphql(
            Some(&root),
            "mutation($k: ID!) { createServer(input: { name: \"s\", host: \"10.0.0.1\", privateKeyId: $k }) { id } }",
            json!({ "k": key }),
        )
        .await
        .ok()["createServer"]["id"]
        .clone();
    let write = token(&app, &root, &["read", "write"]).await;
    let trusted = token(&app, &root, &["read", "read:sensitive", "write"]).await;
    let update = "mutation($input: UpdateApplicationInput!) { updateApplication(input: $input) { version } }";

    let redirections = [
        json!({ "gitUrl": "https://evil.example.org/steal.git" }),
        json!({ "gitRef": "refs/pull/1/head" }),
        json!({ "dockerfile": "leak.Dockerfile" }),
        json!({ "deployKeyId": key }),
        json!({ "serverId": server }),
    ];
    for fields in &redirections {
        let mut input = fields.clone();
        input["id"] = web.clone();
        let refused = app.graphql(Some(&write), update, json!({ "input": input })).await;
        assert_eq!(refused.code(), "FORBIDDEN", "{fields}: {:?}", refused.errors);
    }
    let unchanged = app.graphql(Some(&root), APPLICATION, json!({ "id": web })).await.ok();
    assert_eq!(unchanged["application"]["version"], 1, "nothing changed: {unchanged}");
    // A server's address is the same kind of choice.
    let repoint = "mutation($id: ID!) { updateServer(input: { id: $id, host: \"evil.example.org\" }) { id } }";
    assert_eq!(app.graphql(Some(&write), repoint, json!({ "id": server })).await.code(), "FORBIDDEN");

    // What does not move the secrets stays open to `write`; the rest to `read:sensitive`.
    app.graphql(Some(&write), update, json!({ "input": { "id": web, "port": 8081 } })).await.ok();
    for fields in &redirections {
        let mut input = fields.clone();
        input["id"] = web.clone();
        app.graphql(Some(&trusted), update, json!({ "input": input })).await.ok();
    }
    let moved = app.graphql(Some(&root), APPLICATION, json!({ "id": web })).await.ok();
    assert_eq!(moved["application"]["gitUrl"], "https://evil.example.org/steal.git", "{moved}");
    assert_eq!(moved["application"]["serverId"], server);
}

#[tokio::test]
async fn update_application_sets_limits_the_deploy_key_and_health_check_timings() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root).await;
    let create = "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\",
        gitUrl: \"https://git.example.com/acme/web.git\", memoryBytes: 67108864 }) { id } }";
    let web = app.graphql(Some(&root), create, json!({ "p": project })).await.ok()["createApplication"]["id"].clone();
    let key = app.graphql(Some(&root), "mutation { addPrivateKey(input: { name: \"k\" }) { id } }", json!({})).await;
    let key = key.ok()["addPrivateKey"]["id"].clone();
    let update = "mutation($input: UpdateApplicationInput!) { updateApplication(input: $input) { version } }";
    let input = json!({ "id": web, "deployKeyId": key, "cpuMillis": 500,
                        "healthCheck": { "intervalSecs": 5, "timeoutSecs": 3, "retries": 4, "startPeriodSecs": 10 } });
    app.graphql(Some(&root), update, json!({ "input": input })).await.ok();
    let app_now = app.graphql(Some(&root), APPLICATION, json!({ "id": web })).await.ok()["application"].clone();
    assert_eq!(app_now["deployKeyId"], key);
    assert_eq!(app_now["limits"], json!({ "memoryBytes": 67_108_864, "cpuMillis": 500 }), "memory is kept");
    assert_eq!(
        app_now["healthCheck"],
        json!({ "path": "/", "intervalSecs": 5, "timeoutSecs": 3, "retries": 4, "startPeriodSecs": 10 })
    );
    // `null` lifts a limit; clearDeployKey clones without a key; a bad timing names its field.
    let input = json!({ "id": web, "memoryBytes": null, "clearDeployKey": true });
    app.graphql(Some(&root), update, json!({ "input": input })).await.ok();
    let app_now = app.graphql(Some(&root), APPLICATION, json!({ "id": web })).await.ok()["application"].clone();
    assert_eq!(app_now["limits"], json!({ "memoryBytes": null, "cpuMillis": 500 }));
    assert_eq!(app_now["deployKeyId"], Value::Null);
    let bad = json!({ "id": web, "healthCheck": { "timeoutSecs": 30 } });
    let refused = app.graphql(Some(&root), update, json!({ "input": bad })).await;
    assert_eq!(refused.code(), "INVALID_INPUT", "{:?}", refused.errors);
    assert_eq!(refused.error()["extensions"]["field"], "healthCheck");
}

#[tokio::test]
async fn a_key_asking_for_endless_kdf_rounds_is_refused_at_once_while_the_server_keeps_answering() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let pem = zpanel_commands::testing::protected_key_with_rounds(u32::MAX);
    let add = "mutation($pem: String!) {
        addPrivateKey(input: { name: \"pinned\", privateKey: $pem, passphrase: \"correct horse\" }) { id } }";
    // More of them than the runtime has threads, and other requests beside them.
    let started = Instant::now();
    let attacks = join_all((0..4).map(|_| app.graphql(Some(&root), add, json!({ "pem": pem }))));
    let others = join_all((0..4).map(|_| app.graphql(Some(&root), "{ team { id } }", json!({}))));
    let within = tokio::time::timeout(Duration::from_secs(15), async { tokio::join!(attacks, others) }).await;
    let (attacks, others) = within.expect("every request is answered promptly (no thread is pinned)");
    for refused in attacks {
        assert_eq!(refused.code(), "INVALID_INPUT", "{:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "privateKey");
        let message = refused.error()["message"].as_str().unwrap_or_default();
        assert!(message.contains("rounds"), "{message}");
    }
    for answered in others {
        answered.ok();
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    let keys = app.graphql(Some(&root), "{ privateKeys { id } }", json!({})).await.ok();
    assert_eq!(keys["privateKeys"], json!([]), "nothing was added");
}

/// Asks for a validation of a new server at `127.0.0.1:port` and waits for its result.
async fn validated_error(app: &App, token: &str, key: &Value, name: &str, port: u16) -> String {
    let create = "mutation($name: String!, $port: Int!, $key: ID!) {
        createServer(input: { name: $name, host: \"127.0.0.1\", port: $port, user: \"root\", privateKeyId: $key }) { id } }";
    let created = app.graphql(Some(token), create, json!({ "name": name, "port": port, "key": key })).await.ok();
    let id = created["createServer"]["id"].clone();
    let validate = "mutation($id: ID!) { validateServer(input: { serverId: $id }) { status } }";
    app.graphql(Some(token), validate, json!({ "id": id })).await.ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let server =
            app.graphql(Some(token), "query($id: ID!) { server(id: $id) { status lastError } }", json!({ "id": id }));
        let server = server.await.ok()["server"].clone();
        if server["status"] == "UNREACHABLE" {
            return server["lastError"].as_str().unwrap_or_default().replace(&port.to_string(), "PORT");
        }
        assert_ne!(server["status"], "REACHABLE", "{server}");
        assert!(Instant::now() < deadline, "the validation did not finish: {server}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn validating_a_server_never_used_tells_nothing_of_what_listens_there_and_is_rationed() {
    let app = App::start_with(&[("ZPANEL_SERVER_CHECK_SECONDS", "0")]).await;
    let root = app.bootstrap("Acme");
    let key = app.graphql(Some(&root), "mutation { addPrivateKey(input: { name: \"k\" }) { id } }", json!({})).await;
    let key = key.ok()["addPrivateKey"]["id"].clone();
    // Nothing listening; something that is not SSH (the API itself); an SSH server that does
    // not know the key: one answer for all three, whatever the port.
    let closed = zpanel_tests::deploy::free_port();
    let api_port: u16 = app.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the API's port");
    let sshd = zpanel_tests::deploy::Sshd::start();
    let told = [
        validated_error(&app, &root, &key, "closed", closed).await,
        validated_error(&app, &root, &key, "http", api_port).await,
        validated_error(&app, &root, &key, "ssh", sshd.port).await,
    ];
    assert!(told.iter().all(|t| *t == told[0]), "{told:#?}");
    for leak in ["refused", "no answer", "protocol", "authentication", "SSH session"] {
        assert!(!told[0].contains(leak), "{leak} in {}", told[0]);
    }
    assert!(told[0].contains("could not log in") && told[0].contains("authorized_keys"), "{}", told[0]);

    // A team has a budget of validations: past it, RATE_LIMITED, with when to retry.
    let servers = app.graphql(Some(&root), "{ servers { id } }", json!({})).await.ok();
    let id = servers["servers"][0]["id"].clone();
    let validate = "mutation($id: ID!) { validateServer(input: { serverId: $id }) { id } }";
    let mut limited = None;
    for _ in 0..20 {
        let answer = app.graphql(Some(&root), validate, json!({ "id": id })).await;
        if !answer.errors.is_empty() {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("the budget ran out");
    assert_eq!(limited.code(), "RATE_LIMITED", "{:?}", limited.errors);
    assert!(limited.error()["extensions"]["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0));
}

/// A Zpanel wired to its own Caddy; deployments from local repositories.
struct Routing {
    app: App,
    caddy: Caddy,
    http: reqwest::Client,
    made: Vec<String>,
}

impl Routing {
    async fn start() -> Self {
        ensure_base_image();
        let caddy = Caddy::start();
        let app = App::start_with(&caddy.env()).await;
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().expect("client");
        Self { app, caddy, http, made: Vec::new() }
    }

    /// Creates an application answering `page` on `domains`, deploys it, waits for success.
    async fn deployed(&mut self, token: &str, project: &str, page: &str, repo: &Repo, domains: &[&str]) -> String {
        let vars = json!({ "project": project, "name": page, "url": repo.url(), "domains": domains });
        let created = self.app.graphql(Some(token), CREATE_GIT_APP, vars).await.ok();
        let id = created["createApplication"]["id"].as_str().expect("id").to_owned();
        self.made.push(id.clone());
        self.deploy(token, &id).await;
        id
    }

    async fn deploy(&self, token: &str, id: &str) {
        let deploy = "mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id } }";
        let queued = self.app.graphql(Some(token), deploy, json!({ "id": id })).await.ok();
        let deployment = queued["deployApplication"]["id"].clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let q = "query($id: ID!) { deployment(id: $id) { status failure } }";
            let d = self.app.graphql(Some(token), q, json!({ "id": deployment })).await.ok()["deployment"].clone();
            match d["status"].as_str() {
                Some("SUCCEEDED") => return,
                Some("FAILED" | "CANCELLED") => panic!("the deployment did not succeed: {d}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "the deployment did not finish: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn page(&self, domain: &str) -> String {
        match page(&self.http, &self.caddy.listen, domain).await {
            Ok((200, body)) => body,
            other => panic!("{domain}: {other:?}"),
        }
    }

    /// Polls until `domain` answers `expected` (a change in Caddy follows an event).
    async fn until_page(&self, domain: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = page(&self.http, &self.caddy.listen, domain).await;
            if matches!(&got, Ok((200, body)) if body == expected) {
                return;
            }
            assert!(Instant::now() < deadline, "{domain} did not answer {expected}: {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        for id in &self.made {
            remove_application(id);
        }
    }
}

#[tokio::test]
async fn an_exact_host_is_routed_before_a_wildcard_that_was_routed_first() {
    let mut env = Routing::start().await;
    let root = env.app.bootstrap("Acme");
    let project = project(&env.app, &root).await;
    let (catchall, exact) = (Repo::new("catchall"), Repo::new("exact"));
    env.deployed(&root, &project, "catchall", &catchall, &["*.order.zpanel.test"]).await;
    env.deployed(&root, &project, "exact", &exact, &["shop.order.zpanel.test"]).await;
    assert_eq!(env.page("shop.order.zpanel.test").await, "exact");
    assert_eq!(env.page("other.order.zpanel.test").await, "catchall");
}

#[tokio::test]
async fn a_domain_given_up_stops_being_routed_and_goes_to_the_team_that_claims_it_next() {
    let mut env = Routing::start().await;
    let a = env.app.bootstrap("Team A");
    let b = env.app.bootstrap("Team B");
    let (pa, pb) = (project(&env.app, &a).await, project(&env.app, &b).await);
    let (theirs, mine) = (Repo::new("team a"), Repo::new("team b"));
    let first = env.deployed(&a, &pa, "first", &theirs, &["moving.zpanel.test", "*.moving.zpanel.test"]).await;
    assert_eq!(env.page("moving.zpanel.test").await, "team a");
    // A moves on (no new deployment); B takes the names over and deploys.
    let moved = env.app.graphql(Some(&a), SET_DOMAINS, json!({ "id": first, "domains": ["moved.zpanel.test"] }));
    moved.await.ok();
    env.deployed(&b, &pb, "second", &mine, &["moving.zpanel.test", "*.moving.zpanel.test"]).await;
    env.until_page("moving.zpanel.test", "team b").await;
    env.until_page("x.moving.zpanel.test", "team b").await;
    // A's next deployment (or a rollback to its first release) routes only what A holds.
    env.deploy(&a, &first).await;
    assert_eq!(env.page("moving.zpanel.test").await, "team b");
    assert_eq!(env.page("x.moving.zpanel.test").await, "team b");
}
