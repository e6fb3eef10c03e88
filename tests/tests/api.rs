//! The GraphQL API end to end: the real `zpanel serve` on a free port against real PostgreSQL,
//! spoken to over HTTP and WebSocket.

use serde_json::{Value, json};
use zpanel_tests::api::{App, receive, send};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id name } }";
const CREATE_APP: &str = "mutation($project: ID!, $name: String!, $domain: String!) {
    createApplication(input: { projectId: $project, name: $name, image: \"nginx:1.27\", port: 8080,
                               domains: [$domain] }) { id name version status image port domains } }";
const SET_VAR: &str = "mutation($app: ID!, $key: String!, $value: String!, $secret: Boolean) {
    setEnvironmentVariable(input: { applicationId: $app, key: $key, value: $value, secret: $secret }) {
        version env { key value secret } } }";
const CREATE_TOKEN: &str = "mutation($name: String!, $abilities: [String!]!) {
    createApiToken(input: { name: $name, abilities: $abilities }) { token apiToken { id abilities } } }";

async fn project(app: &App, token: &str, name: &str) -> String {
    let data = app.graphql(Some(token), CREATE_PROJECT, json!({ "name": name })).await.ok();
    data["createProject"]["id"].as_str().expect("project id").to_owned()
}

async fn application(app: &App, token: &str, project: &str, name: &str) -> String {
    // Domains are unique across the installation: each application gets its own.
    let domain = format!("{name}.example.com");
    let data =
        app.graphql(Some(token), CREATE_APP, json!({ "project": project, "name": name, "domain": domain })).await.ok();
    data["createApplication"]["id"].as_str().expect("application id").to_owned()
}

async fn token(app: &App, root: &str, abilities: &[&str]) -> String {
    let data = app
        .graphql(Some(root), CREATE_TOKEN, json!({ "name": format!("{abilities:?}"), "abilities": abilities }))
        .await
        .ok();
    data["createApiToken"]["token"].as_str().expect("a token").to_owned()
}

#[tokio::test]
async fn the_full_flow_from_project_to_time_travel_with_a_live_audit_stream() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let mut events = app
        .subscribe(
            &root,
            "subscription { events { position eventType streamId changes { field before after } } }",
            json!({}),
        )
        .await;

    let project = project(&app, &root, "Shop").await;
    let vars = json!({ "project": project, "name": "web", "domain": "web.example.com" });
    let created = app.graphql(Some(&root), CREATE_APP, vars).await.ok();
    let web = created["createApplication"]["id"].as_str().expect("id").to_owned();
    assert_eq!(created["createApplication"]["version"], 1);
    assert_eq!(created["createApplication"]["status"], "ACTIVE");
    assert_eq!(created["createApplication"]["domains"], json!(["web.example.com"]));

    let vars = json!({ "app": web, "key": "DATABASE_URL", "value": "postgres://secret@db/shop", "secret": true });
    let set = app.graphql(Some(&root), SET_VAR, vars).await.ok();
    assert_eq!(set["setEnvironmentVariable"]["version"], 2);
    let plain = json!({ "app": web, "key": "LOG_LEVEL", "value": "info" });
    app.graphql(Some(&root), SET_VAR, plain).await.ok();
    let plain = json!({ "app": web, "key": "LOG_LEVEL", "value": "debug" });
    app.graphql(Some(&root), SET_VAR, plain).await.ok();

    // Masked for a token without read:sensitive, shown to one with it.
    let reader = token(&app, &root, &["read"]).await;
    let env_query = "query($id: ID!) { application(id: $id) { version env { key value secret } webhookSecret } }";
    let masked = app.graphql(Some(&reader), env_query, json!({ "id": web })).await.ok();
    let env = &masked["application"]["env"];
    assert_eq!(env[0], json!({ "key": "DATABASE_URL", "value": null, "secret": true }));
    assert_eq!(env[1], json!({ "key": "LOG_LEVEL", "value": "debug", "secret": false }));
    assert_eq!(masked["application"]["webhookSecret"], Value::Null);
    let sensitive = token(&app, &root, &["read", "read:sensitive"]).await;
    let shown = app.graphql(Some(&sensitive), env_query, json!({ "id": web })).await.ok();
    assert_eq!(shown["application"]["env"][0]["value"], "postgres://secret@db/shop");
    assert_eq!(shown["application"]["webhookSecret"].as_str().map(str::len), Some(64));

    // The audit log: before and after; the secret only as changed.
    let audit = app
        .graphql(
            Some(&reader),
            "query($stream: String) { auditLog(filter: { streamId: $stream }, first: 10) {
                totalCount nodes { eventType version actor { kind name } changes { field before after secret } } } }",
            json!({ "stream": format!("application-{web}") }),
        )
        .await
        .ok();
    let nodes = audit["auditLog"]["nodes"].as_array().expect("nodes");
    assert_eq!(audit["auditLog"]["totalCount"], 4);
    assert_eq!(nodes[0]["eventType"], "EnvironmentVariableSet");
    assert_eq!(nodes[0]["actor"]["kind"], "token");
    assert_eq!(
        nodes[0]["changes"],
        json!([{ "field": "env.LOG_LEVEL", "before": "info", "after": "debug", "secret": false }])
    );
    assert_eq!(nodes[2]["changes"][0]["field"], "env.DATABASE_URL");
    assert_eq!(nodes[2]["changes"][0]["after"], "[secret]");
    assert_eq!(nodes[3]["eventType"], "ApplicationCreated");
    let everything = audit.to_string();
    assert!(!everything.contains("postgres://secret"), "no secret in the audit log: {everything}");

    // Time travel and diff.
    let at = app
        .graphql(
            Some(&reader),
            "query($id: ID!) { first: applicationAt(id: $id, version: 1) { version env { key } }
                               diff: applicationDiff(id: $id, fromVersion: 1, toVersion: 4) { field before after secret } }",
            json!({ "id": web }),
        )
        .await
        .ok();
    assert_eq!(at["first"], json!({ "version": 1, "env": [] }));
    assert_eq!(
        at["diff"],
        json!([
            { "field": "env.DATABASE_URL", "before": null, "after": "[secret]", "secret": true },
            { "field": "env.DATABASE_URL.buildTime", "before": null, "after": false, "secret": false },
            { "field": "env.LOG_LEVEL", "before": null, "after": "debug", "secret": false },
            { "field": "env.LOG_LEVEL.buildTime", "before": null, "after": false, "secret": false },
        ])
    );

    // The live stream saw every change, in order: project, application, three variables,
    // and the two tokens.
    let mut seen = Vec::new();
    while seen.len() < 7 {
        let data = events.next_data().await.unwrap_or_else(|m| panic!("expected an event, got {m:?}"));
        seen.push(data["events"]["eventType"].as_str().expect("type").to_owned());
    }
    assert_eq!(
        seen,
        [
            "ProjectCreated",
            "ApplicationCreated",
            "EnvironmentVariableSet",
            "EnvironmentVariableSet",
            "EnvironmentVariableSet",
            "ApiTokenCreated",
            "ApiTokenCreated"
        ]
    );
}

#[tokio::test]
async fn another_teams_ids_answer_exactly_like_missing_ones() {
    let app = App::start_api().await;
    let a = app.bootstrap("Team A");
    let b = app.bootstrap("Team B");
    let project = project(&app, &a, "Shop").await;
    let web = application(&app, &a, &project, "web").await;
    let missing = uuid::Uuid::now_v7().to_string();

    for id in [&web, &missing] {
        let q = app
            .graphql(
                Some(&b),
                "query($id: ID!) { application(id: $id) { id } project(id: $id) { id } deployment(id: $id) { id }
                                   server(id: $id) { id } applicationAt(id: $id, version: 1) { id } }",
                json!({ "id": id }),
            )
            .await;
        // applicationAt answers NOT_FOUND for a stream it cannot see; the others null.
        assert_eq!(q.code(), "NOT_FOUND", "{id}: {:?}", q.errors);
        assert_eq!(q.data["application"], Value::Null);
        assert_eq!(q.data["project"], Value::Null);
    }
    let listing = app.graphql(Some(&b), "{ projects { id } applications { totalCount } }", json!({})).await.ok();
    assert_eq!(listing, json!({ "projects": [], "applications": { "totalCount": 0 } }));
    let pid = project.clone();
    let key =
        app.graphql(Some(&a), "mutation { addPrivateKey(input: { name: \"deploy\" }) { id } }", json!({})).await.ok();
    let key = key["addPrivateKey"]["id"].as_str().expect("key id").to_owned();
    let server = app
        .graphql(
            Some(&a),
            "mutation($k: ID!) { createServer(input: { name: \"edge\", host: \"127.0.0.1\", privateKeyId: $k }) { id } }",
            json!({ "k": key }),
        )
        .await
        .ok();
    let server = server["createServer"]["id"].as_str().expect("server id").to_owned();
    let deployed = app
        .graphql(
            Some(&a),
            "mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id } }",
            json!({ "id": web }),
        )
        .await
        .ok();
    let deployment = deployed["deployApplication"]["id"].as_str().expect("deployment id").to_owned();
    let a_token = app.graphql(Some(&a), "{ apiTokens { id } }", json!({})).await.ok()["apiTokens"][0]["id"]
        .as_str()
        .expect("a token id")
        .to_owned();
    // B has a key of its own; it lists that one, never A's.
    app.graphql(Some(&b), "mutation { addPrivateKey(input: { name: \"b\" }) { id } }", json!({})).await.ok();
    for (mutation, vars) in [
        ("mutation($id: ID!) { renameProject(input: { id: $id, name: \"Mine\" }) { id } }", json!({ "id": pid })),
        ("mutation($id: ID!) { archiveProject(input: { id: $id }) { id } }", json!({ "id": pid })),
        ("mutation($id: ID!) { cancelDeployment(input: { deploymentId: $id }) { id } }", json!({ "id": deployment })),
        (
            "mutation($a: ID!, $d: ID!) { rollbackApplication(input: { applicationId: $a, deploymentId: $d }) { id } }",
            json!({ "a": web, "d": deployment }),
        ),
        ("mutation($id: ID!) { validateServer(input: { serverId: $id }) { id } }", json!({ "id": server })),
        ("mutation($id: ID!) { updateServer(input: { id: $id, name: \"Mine\" }) { id } }", json!({ "id": server })),
        ("mutation($id: ID!) { removeServer(input: { id: $id }) { id } }", json!({ "id": server })),
        // A's key is in use by A's server: B is not told so, only that there is no such key.
        ("mutation($id: ID!) { removePrivateKey(input: { id: $id }) { id } }", json!({ "id": key })),
        ("mutation($id: ID!) { revokeApiToken(input: { id: $id }) { id } }", json!({ "id": a_token })),
    ] {
        let answer = app.graphql(Some(&b), mutation, vars).await;
        assert_eq!(answer.code(), "NOT_FOUND", "{mutation}: {:?}", answer.errors);
        // And exactly so for an id that exists nowhere.
        let answer = app.graphql(Some(&b), mutation, json!({ "id": missing, "a": missing, "d": missing })).await;
        assert_eq!(answer.code(), "NOT_FOUND", "{mutation} of a missing id: {:?}", answer.errors);
    }
    // Another team's key cannot be used for one's own server: it does not exist for B.
    let borrowed = app
        .graphql(
            Some(&b),
            "mutation($k: ID!) { createServer(input: { name: \"x\", host: \"127.0.0.1\", privateKeyId: $k }) { id } }",
            json!({ "k": key }),
        )
        .await;
    assert_eq!(borrowed.code(), "INVALID_INPUT");
    assert_eq!(borrowed.error()["extensions"]["field"], "privateKeyId");
    let lists = app
        .graphql(Some(&b), "{ servers { id } privateKeys { name } deployment(id: \"x\") { id } }", json!({}))
        .await
        .ok();
    assert_eq!(lists["servers"], json!([]));
    assert_eq!(lists["privateKeys"], json!([{ "name": "b" }]));
    let mutations = [
        ("mutation($id: ID!) { archiveApplication(input: { id: $id }) { id } }", json!({ "id": web })),
        ("mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id } }", json!({ "id": web })),
        (
            "mutation($id: ID!) { createEnvironment(input: { projectId: $id, name: \"staging\" }) { id } }",
            json!({ "id": pid }),
        ),
        (SET_VAR, json!({ "app": web, "key": "A", "value": "b" })),
        (
            "mutation($id: ID!) { unsetEnvironmentVariable(input: { applicationId: $id, key: \"A\" }) { id } }",
            json!({ "id": web }),
        ),
        ("mutation($id: ID!) { updateApplication(input: { id: $id, port: 81 }) { id } }", json!({ "id": web })),
        ("mutation($id: ID!) { runServerCheck(input: { serverId: $id }) { id } }", json!({ "id": server })),
        (
            "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"x\", image: \"a:1\" }) { id } }",
            json!({ "p": pid }),
        ),
    ];
    for (mutation, vars) in mutations {
        let answer = app.graphql(Some(&b), mutation, vars).await;
        assert_eq!(answer.code(), "NOT_FOUND", "{mutation}: {:?}", answer.errors);
    }
    for (query, vars) in [
        ("query($id: ID!) { deployments(applicationId: $id) { totalCount } }", json!({ "id": web })),
        ("query($id: ID!) { events(streamId: $id) { position } }", json!({ "id": format!("application-{web}") })),
        ("query($id: ID!) { applicationDiff(id: $id, fromVersion: 0, toVersion: 1) { field } }", json!({ "id": web })),
        ("query($id: ID!) { serverFacts(serverId: $id) { os } }", json!({ "id": server })),
        ("query { serverFacts(serverId: \"not-an-id\") { os } }", json!({})),
    ] {
        assert_eq!(app.graphql(Some(&b), query, vars).await.code(), "NOT_FOUND", "{query}");
    }
    let mut sub =
        app.subscribe(&b, "subscription($id: ID!) { applicationUpdated(id: $id) { id } }", json!({ "id": web })).await;
    let refused = sub.message().await.expect("an answer");
    assert_eq!(refused["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND", "{refused}");
    assert_eq!(refused["payload"]["data"], Value::Null);
    // And team A's application is untouched.
    let a_view = app
        .graphql(Some(&a), "query($id: ID!) { application(id: $id) { version port } }", json!({ "id": web }))
        .await
        .ok();
    assert_eq!(a_view["application"], json!({ "version": 1, "port": 8080 }));
}

#[tokio::test]
async fn abilities_gate_each_kind_of_operation() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root, "Shop").await;
    let web = application(&app, &root, &project, "web").await;
    let read = token(&app, &root, &["read"]).await;
    let write = token(&app, &root, &["read", "write"]).await;
    let deploy = token(&app, &root, &["read", "deploy"]).await;

    let set = json!({ "app": web, "key": "A", "value": "1" });
    assert_eq!(app.graphql(Some(&read), SET_VAR, set.clone()).await.code(), "FORBIDDEN");
    assert_eq!(app.graphql(Some(&deploy), SET_VAR, set.clone()).await.code(), "FORBIDDEN");
    app.graphql(Some(&write), SET_VAR, set).await.ok();

    // Choosing the code or the server an application's secrets go to is reading them.
    let sensitive = token(&app, &root, &["read", "read:sensitive", "write"]).await;
    let source = "mutation($id: ID!) { updateApplication(input: { id: $id, image: \"nginx:1.28\" }) { image } }";
    assert_eq!(app.graphql(Some(&write), source, json!({ "id": web })).await.code(), "FORBIDDEN");
    assert_eq!(app.graphql(Some(&read), source, json!({ "id": web })).await.code(), "FORBIDDEN");
    let moved = app.graphql(Some(&sensitive), source, json!({ "id": web })).await.ok();
    assert_eq!(moved["updateApplication"]["image"], "nginx:1.28");

    let deploy_q = "mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id status } }";
    assert_eq!(app.graphql(Some(&write), deploy_q, json!({ "id": web })).await.code(), "FORBIDDEN");
    let queued = app.graphql(Some(&deploy), deploy_q, json!({ "id": web })).await.ok();
    assert_eq!(queued["deployApplication"]["status"], "QUEUED");

    // Tokens: only root, and never more than the creator has.
    assert_eq!(
        app.graphql(Some(&write), CREATE_TOKEN, json!({ "name": "x", "abilities": ["read"] })).await.code(),
        "FORBIDDEN"
    );
    assert_eq!(app.graphql(Some(&read), "{ apiTokens { id } }", json!({})).await.code(), "FORBIDDEN");
    let tokens = app.graphql(Some(&root), "{ apiTokens { name abilities revoked } }", json!({})).await.ok();
    assert_eq!(tokens["apiTokens"].as_array().map(Vec::len), Some(5));
    // No token at all: UNAUTHENTICATED.
    assert_eq!(app.graphql(None, "{ projects { id } }", json!({})).await.code(), "UNAUTHENTICATED");
    assert_eq!(app.graphql(Some("zp_nonsense"), "{ projects { id } }", json!({})).await.code(), "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_once_even_on_an_open_subscription() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let reader = app.graphql(Some(&root), CREATE_TOKEN, json!({ "name": "ci", "abilities": ["read"] })).await.ok();
    let secret = reader["createApiToken"]["token"].as_str().expect("token").to_owned();
    let id = reader["createApiToken"]["apiToken"]["id"].as_str().expect("id").to_owned();
    app.graphql(Some(&secret), "{ projects { id } }", json!({})).await.ok();
    let mut sub = app.subscribe(&secret, "subscription { events { eventType } }", json!({})).await;

    let revoked = app
        .graphql(
            Some(&root),
            "mutation($id: ID!) { revokeApiToken(input: { id: $id }) { revoked } }",
            json!({ "id": id }),
        )
        .await
        .ok();
    assert_eq!(revoked["revokeApiToken"]["revoked"], true);
    assert_eq!(app.graphql(Some(&secret), "{ projects { id } }", json!({})).await.code(), "UNAUTHENTICATED");
    // The subscription ends with UNAUTHENTICATED instead of delivering anything more.
    let ended = sub.message().await.expect("the subscription is told");
    let codes = ended["payload"].to_string();
    assert!(codes.contains("UNAUTHENTICATED"), "{ended}");
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root, "Shop").await;
    let before = app.graphql(Some(&root), "{ auditLog { totalCount } }", json!({})).await.ok();
    let cases = [
        (CREATE_PROJECT, json!({ "name": "" }), "name"),
        (
            "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\", gitUrl: \"--upload-pack=evil\" }) { id } }",
            json!({ "p": project }),
            "gitUrl",
        ),
        (
            "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\", gitUrl: \"https://example.com/a.git\", gitRef: \"main;rm -rf /\" }) { id } }",
            json!({ "p": project }),
            "gitRef",
        ),
        (
            "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\", image: \"a:1\", port: 70000 }) { id } }",
            json!({ "p": project }),
            "port",
        ),
        (
            "mutation($p: ID!) { createApplication(input: { projectId: $p, name: \"web\", image: \"a:1\", domains: [\"not a domain\"] }) { id } }",
            json!({ "p": project }),
            "domains",
        ),
        (CREATE_TOKEN, json!({ "name": "x", "abilities": ["superuser"] }), "abilities"),
    ];
    for (query, vars, field) in cases {
        let answer = app.graphql(Some(&root), query, vars).await;
        assert_eq!(answer.code(), "INVALID_INPUT", "{query}");
        assert_eq!(answer.error()["extensions"]["field"], field, "{:?}", answer.errors);
        assert!(answer.error()["message"].as_str().is_some_and(|m| m.starts_with(&format!("{field}: "))));
    }
    let after = app.graphql(Some(&root), "{ auditLog { totalCount } }", json!({})).await.ok();
    assert_eq!(before, after, "nothing was written");
}

#[tokio::test]
async fn abuse_limits_hold_and_health_endpoints_answer() {
    let app = App::start_with(&[("ZPANEL_API_RATE", "1"), ("ZPANEL_API_BURST", "5")]).await;
    let root = app.bootstrap("Acme");

    let deep = "{ team { members { role } } applications { nodes { currentDeployment { release } } edges { node { env { key } } } } }";
    assert!(app.graphql(Some(&root), deep, json!({})).await.errors.is_empty(), "an ordinary query passes");
    let aliases: String = (0..40).map(|i| format!("a{i}: me {{ name }} ")).collect();
    let answer = app.graphql(Some(&root), &format!("{{ {aliases} }}"), json!({})).await;
    assert_eq!(answer.code(), "INVALID_INPUT");
    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {{ {}name{} }} }} }} }} }}",
        "ofType { ".repeat(10),
        " }".repeat(10)
    );
    let too_deep = app.graphql(Some(&root), &deep, json!({})).await;
    assert!(
        too_deep.error()["message"].as_str().is_some_and(|m| m.contains("nested too deep")),
        "{:?}",
        too_deep.errors
    );

    // The burst is spent by now (4 requests of 5): one of the next is refused with RATE_LIMITED.
    let mut limited = None;
    for _ in 0..5 {
        let answer = app.graphql(Some(&root), "{ me { name } }", json!({})).await;
        if !answer.errors.is_empty() {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("the rate limit applies");
    assert_eq!(limited.code(), "RATE_LIMITED");
    assert!(limited.error()["extensions"]["retryAfterMs"].as_u64().is_some());

    // Unauthenticated: introspection works, suggestions don't leak field names.
    let typo = app.graphql(None, "{ projectz { id } }", json!({})).await;
    assert!(!typo.error()["message"].as_str().unwrap_or_default().contains("Did you mean"), "{:?}", typo.errors);
    let schema = app.graphql(None, "{ __schema { queryType { name } } }", json!({})).await.ok();
    assert_eq!(schema["__schema"]["queryType"]["name"], "Query");

    // A body over the limit is refused before it is parsed.
    let (status, _) = {
        let big = "x".repeat(2 << 20);
        let response = reqwest::Client::new()
            .post(format!("{}/graphql", app.url))
            .header("content-type", "application/json")
            .body(format!("{{\"query\": \"{big}\"}}"))
            .send()
            .await
            .expect("POST");
        (response.status().as_u16(), ())
    };
    assert_eq!(status, 413);

    assert_eq!(app.get("/healthz").await.0, 200);
    let (ready, body) = app.get("/readyz").await;
    assert_eq!(ready, 200, "{body}");
    let (status, metrics) = app.metrics().await;
    assert_eq!(status, 200);
    assert!(metrics.contains("zpanel_graphql_requests_seconds_count{kind=\"query\",outcome=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("zpanel_projection_lag_seconds{projection=\"audit_log\"}"), "{metrics}");
    let (status, sdl) = app.get("/graphql/schema.graphql").await;
    assert_eq!(status, 200);
    assert_eq!(
        sdl,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../api/schema.graphql")).expect("SDL file")
    );
}

#[tokio::test]
async fn application_and_deployment_subscriptions_follow_their_own_objects_only() {
    // No workers: the test's deployments stay queued until it cancels them.
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root, "Shop").await;
    let web = application(&app, &root, &project, "web").await;
    let other = application(&app, &root, &project, "other").await;
    let mut updated = app
        .subscribe(
            &root,
            "subscription($id: ID!) { applicationUpdated(id: $id) { id version env { key } } }",
            json!({ "id": web }),
        )
        .await;
    let mut deployments = app
        .subscribe(
            &root,
            "subscription($id: ID!) { deploymentUpdated(applicationId: $id) { id status } }",
            json!({ "id": web }),
        )
        .await;

    // A change to another application is not delivered; the next one to this one is, as the
    // read model shows it.
    app.graphql(Some(&root), SET_VAR, json!({ "app": other, "key": "A", "value": "1" })).await.ok();
    app.graphql(Some(&root), SET_VAR, json!({ "app": web, "key": "B", "value": "2" })).await.ok();
    let first = updated.next_data().await.expect("an update");
    assert_eq!(first["applicationUpdated"], json!({ "id": web, "version": 2, "env": [{ "key": "B" }] }));

    let deploy = "mutation($id: ID!) { deployApplication(input: { applicationId: $id }) { id } }";
    app.graphql(Some(&root), deploy, json!({ "id": other })).await.ok();
    let queued = app.graphql(Some(&root), deploy, json!({ "id": web })).await.ok();
    let id = queued["deployApplication"]["id"].clone();
    // Each delivery shows the deployment as the read model has it then, so wait for the first
    // before changing it.
    let seen = deployments.next_data().await.expect("the queued deployment");
    assert_eq!(seen["deploymentUpdated"], json!({ "id": id, "status": "QUEUED" }));
    let cancel = "mutation($id: ID!) { cancelDeployment(input: { deploymentId: $id }) { status } }";
    let cancelled = app.graphql(Some(&root), cancel, json!({ "id": id })).await.ok();
    assert_eq!(cancelled["cancelDeployment"]["status"], "CANCELLED");
    let seen = deployments.next_data().await.expect("the cancelled deployment");
    assert_eq!(seen["deploymentUpdated"], json!({ "id": id, "status": "CANCELLED" }));
}

#[tokio::test]
async fn a_create_retried_with_its_command_id_answers_with_the_first_result() {
    let app = App::start_api().await;
    let root = app.bootstrap("Acme");
    let command = uuid::Uuid::now_v7().to_string();
    let create = "mutation($name: String!, $command: ID!) {
        createProject(input: { name: $name, commandId: $command }) { id name version } }";
    let first = app.graphql(Some(&root), create, json!({ "name": "Shop", "command": command })).await.ok();
    let again = app.graphql(Some(&root), create, json!({ "name": "Shop", "command": command })).await.ok();
    assert_eq!(first, again, "the same project, not a second one or an error");
    let projects = app.graphql(Some(&root), "query { projects { id } }", json!({})).await.ok();
    assert_eq!(projects["projects"].as_array().map(Vec::len), Some(1));

    let project = first["createProject"]["id"].clone();
    let command = uuid::Uuid::now_v7().to_string();
    let create_app = "mutation($project: ID!, $command: ID!) {
        createApplication(input: { projectId: $project, name: \"web\", image: \"nginx:1.27\", commandId: $command }) { id } }";
    let vars = json!({ "project": project, "command": command });
    let first = app.graphql(Some(&root), create_app, vars.clone()).await.ok();
    let again = app.graphql(Some(&root), create_app, vars).await.ok();
    assert_eq!(first, again);

    let deploy = "mutation($app: ID!, $command: ID!) {
        deployApplication(input: { applicationId: $app, commandId: $command }) { id } }";
    let vars = json!({ "app": first["createApplication"]["id"], "command": uuid::Uuid::now_v7().to_string() });
    let first = app.graphql(Some(&root), deploy, vars.clone()).await.ok();
    let again = app.graphql(Some(&root), deploy, vars).await.ok();
    assert_eq!(first, again, "one deployment");

    // A command id used for one thing cannot be reused for another.
    let reuse = app.graphql(Some(&root), create, json!({ "name": "Other", "command": command })).await;
    assert_eq!(reuse.code(), "INVALID_INPUT");
    assert_eq!(reuse.error()["extensions"]["field"], "commandId");
}

#[tokio::test]
async fn a_repeated_query_sees_every_change_made_through_any_process() {
    // Answers of read-model queries are reused while the read models stand still (ADR 0014):
    // each change, through this process or another one, must show in the very next answer.
    let app = App::start_api().await;
    let peer = app.peer("api").await;
    let root = app.bootstrap("Acme");
    let project = project(&app, &root, "shop").await;
    let id = application(&app, &root, &project, "web").await;
    let query = "{ applications(first: 10) { nodes { id env { key value } } } }";
    let values = |answer: Value| -> Vec<String> {
        answer["applications"]["nodes"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|v| format!("{}={}", v["key"].as_str().unwrap_or_default(), v["value"].as_str().unwrap_or_default()))
            .collect()
    };
    for (round, url) in [&app.url, &peer.url, &app.url, &peer.url].into_iter().enumerate() {
        let before_here = values(app.graphql(Some(&root), query, json!({})).await.ok());
        let before_there = values(app.graphql_at(&peer.url, Some(&root), query, json!({})).await.ok());
        assert_eq!(before_here, before_there);
        // Set through one process, read at once through both.
        let value = format!("v{round}");
        app.graphql_at(
            url,
            Some(&root),
            SET_VAR,
            json!({ "app": id, "key": "ROUND", "value": value, "secret": false }),
        )
        .await
        .ok();
        let expected = vec![format!("ROUND={value}")];
        assert_eq!(values(app.graphql(Some(&root), query, json!({})).await.ok()), expected, "round {round}, here");
        assert_eq!(
            values(app.graphql_at(&peer.url, Some(&root), query, json!({})).await.ok()),
            expected,
            "round {round}, in the other process"
        );
    }

    // A token used (and its lookup kept) in both processes, then revoked through one: the other
    // refuses it on the next request.
    let reader = app.graphql(Some(&root), CREATE_TOKEN, json!({ "name": "ci", "abilities": ["read"] })).await.ok();
    let secret = reader["createApiToken"]["token"].as_str().expect("token").to_owned();
    let token_id = reader["createApiToken"]["apiToken"]["id"].as_str().expect("id").to_owned();
    app.graphql(Some(&secret), query, json!({})).await.ok();
    app.graphql_at(&peer.url, Some(&secret), query, json!({})).await.ok();
    app.graphql(
        Some(&root),
        "mutation($id: ID!) { revokeApiToken(input: { id: $id }) { revoked } }",
        json!({ "id": token_id }),
    )
    .await
    .ok();
    assert_eq!(app.graphql_at(&peer.url, Some(&secret), query, json!({})).await.code(), "UNAUTHENTICATED");
    assert_eq!(app.graphql(Some(&secret), query, json!({})).await.code(), "UNAUTHENTICATED");
}

/// The value of `metric` in `/metrics`, once it is `wanted` (polled for up to 10 s).
async fn metric_reaches(app: &App, metric: &str, wanted: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, body) = app.metrics().await;
        let value = body.lines().find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')).map(str::to_owned);
        if value.as_deref() == Some(wanted) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{metric} stayed {value:?}, not {wanted}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Subscribers of one `events` subscription share its execution; one that stops reading falls
/// behind the shared responses and catches up alone from the audit log — every entry once, in
/// order, the first after the gap flagged as resynchronised — while the others go on.
#[tokio::test]
async fn subscribers_of_one_audit_stream_share_its_execution_and_a_slow_one_catches_up_alone() {
    let app = App::start_with(&[("ZPANEL_SUBSCRIPTION_BUFFER", "4")]).await;
    let root = app.bootstrap("Shared");
    let web = application(&app, &root, &project(&app, &root, "Shop").await, "web").await;
    let document = "subscription { events { position eventType resynchronised changes { field after } } }";
    let mut fast = app.subscribe(&root, document, json!({})).await;
    let mut slow = app.subscribe_with_buffer(&root, document, json!({}), Some(4096)).await;
    let mut other = app.subscribe(&root, "subscription { events { position } }", json!({})).await;
    metric_reaches(&app, "zpanel_shared_subscription_executions", "2").await;

    // Each change carries 500 KB: the slow subscriber's socket (a kernel send buffer of at
    // most 4 MB on the server's side) is full after a few. The others read as they come.
    let changes = 16;
    let reading = tokio::spawn(async move {
        let mut positions = Vec::new();
        for _ in 0..changes {
            let data = fast.next_data().await.expect("the fast subscriber's entry");
            assert_eq!(data["events"]["eventType"], "EnvironmentVariableSet", "{data}");
            positions.push(data["events"]["position"].as_i64().expect("a position"));
            let other = other.next_data().await.expect("the other subscription's entry");
            assert_eq!(other["events"]["position"], data["events"]["position"]);
        }
        positions
    });
    for i in 0..changes {
        let value = format!("{i:02}{}", "x".repeat(500_000));
        app.graphql(Some(&root), SET_VAR, json!({ "app": web, "key": "BIG", "value": value, "secret": false }))
            .await
            .ok();
    }
    let positions = reading.await.expect("the readers");
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");

    let mut seen = Vec::new();
    let mut resynchronised = 0;
    for _ in 0..changes {
        let data = slow.next_data().await.expect("the slow subscriber's entry");
        let change = &data["events"]["changes"][0]["after"];
        assert!(change.as_str().is_some_and(|v| v.starts_with(&format!("{:02}", seen.len()))), "in order");
        seen.push(data["events"]["position"].as_i64().expect("a position"));
        resynchronised += usize::from(data["events"]["resynchronised"] == true);
    }
    assert_eq!(seen, positions, "every entry once, in order");
    assert!(resynchronised >= 1, "the slow subscriber was told it had fallen behind");
}

/// The `graphql-transport-ws` protocol's rules: who may subscribe, ids, pings, operations other
/// than subscriptions, and a client's `complete`.
#[tokio::test]
async fn the_websocket_session_follows_the_graphql_transport_ws_protocol() {
    let app = App::start().await;
    let root = app.bootstrap("Protocol");

    let mut bad = app.socket("graphql-transport-ws").await;
    send(&mut bad, json!({ "type": "connection_init", "payload": { "authorization": "Bearer zp_nope" } })).await;
    assert_eq!(receive(&mut bad).await, Err(4403), "a bad token is forbidden");

    let mut early = app.socket("graphql-transport-ws").await;
    send(&mut early, json!({ "id": "1", "type": "subscribe", "payload": { "query": "{ me { id } }" } })).await;
    assert_eq!(receive(&mut early).await, Err(4401), "subscribing before the acknowledgement");

    let mut garbled = app.socket("graphql-transport-ws").await;
    send(&mut garbled, json!({ "type": "no_such_message" })).await;
    assert_eq!(receive(&mut garbled).await, Err(4400));

    let mut ws = app.socket("graphql-transport-ws").await;
    let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {root}") } });
    send(&mut ws, init.clone()).await;
    assert_eq!(receive(&mut ws).await, Ok(json!({ "type": "connection_ack" })));
    send(&mut ws, json!({ "type": "ping", "payload": { "n": 1 } })).await;
    assert_eq!(receive(&mut ws).await, Ok(json!({ "type": "pong", "payload": { "n": 1 } })));

    // A query: one result, then complete.
    send(&mut ws, json!({ "id": "q", "type": "subscribe", "payload": { "query": "{ team { name } }" } })).await;
    let next = receive(&mut ws).await.expect("a result");
    assert_eq!(next, json!({ "id": "q", "type": "next", "payload": { "data": { "team": { "name": "Protocol" } } } }));
    assert_eq!(receive(&mut ws).await, Ok(json!({ "id": "q", "type": "complete" })));

    // A subscription the client completes hears nothing more; the next one does. The session
    // handles messages in order: a pong says those before its ping were handled.
    let events = json!({ "query": "subscription { events { eventType } }" });
    send(&mut ws, json!({ "id": "e", "type": "subscribe", "payload": events })).await;
    send(&mut ws, json!({ "id": "e", "type": "complete" })).await;
    send(&mut ws, json!({ "id": "f", "type": "subscribe", "payload": events })).await;
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(receive(&mut ws).await, Ok(json!({ "type": "pong" })));
    metric_reaches(&app, "zpanel_shared_subscription_executions", "1").await;
    project(&app, &root, "Heard").await;
    let heard = receive(&mut ws).await.expect("an entry");
    assert_eq!(
        heard,
        json!({ "id": "f", "type": "next", "payload": { "data": { "events": { "eventType": "ProjectCreated" } } } })
    );

    send(&mut ws, json!({ "id": "f", "type": "subscribe", "payload": events })).await;
    assert_eq!(receive(&mut ws).await, Err(4409), "an id already running");

    let mut twice = app.socket("graphql-transport-ws").await;
    send(&mut twice, init.clone()).await;
    assert!(receive(&mut twice).await.is_ok());
    send(&mut twice, init).await;
    assert_eq!(receive(&mut twice).await, Err(4429), "a second connection_init");
}

/// The older `graphql-ws` protocol (subscriptions-transport-ws) still works beside it, with the
/// live audit stream shared behind it too.
#[tokio::test]
async fn the_older_graphql_ws_protocol_still_subscribes() {
    let app = App::start().await;
    let root = app.bootstrap("Legacy");
    let mut ws = app.socket("graphql-ws").await;
    send(&mut ws, json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {root}") } })).await;
    assert_eq!(receive(&mut ws).await.expect("an answer")["type"], "connection_ack");
    let start = json!({ "id": "1", "type": "start", "payload": { "query": "subscription { events { eventType } }" } });
    send(&mut ws, start).await;
    metric_reaches(&app, "zpanel_shared_subscription_executions", "1").await;
    project(&app, &root, "Old").await;
    let data = receive(&mut ws).await.expect("an entry");
    assert_eq!(
        data,
        json!({ "id": "1", "type": "data", "payload": { "data": { "events": { "eventType": "ProjectCreated" } } } })
    );
}
