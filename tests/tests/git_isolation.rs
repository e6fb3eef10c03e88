//! A tenant's git reaches nothing of the worker's host, tried as a tenant would try it: local
//! repositories outside the roots the operator allows (directly, through a link, or through a
//! submodule), the worker user's own credentials (`~/.netrc`), and credentials written into a
//! URL shown back to whoever can read the application.

use serde_json::{Value, json};
use zpanel_tests::TempDir;
use zpanel_tests::api::{Answer, App};
use zpanel_tests::deploy::{
    Caddy, GitHttpServer, Repo, deployment_log, ensure_base_image, remove_application, repositories_root,
};

const CREATE_PROJECT: &str = "mutation($name: String!) { createProject(input: { name: $name }) { id } }";
const CREATE_APP: &str = "mutation($project: ID!, $name: String!, $url: String!) {
    createApplication(input: { projectId: $project, name: $name, gitUrl: $url, gitRef: \"main\", port: 8080 }) {
        id gitUrl } }";
const UPDATE_URL: &str =
    "mutation($id: ID!, $url: String!) { updateApplication(input: { id: $id, gitUrl: $url }) { id gitUrl } }";
const APPLICATION: &str = "query($id: ID!) { application(id: $id) { gitUrl } }";
const DEPLOY: &str = "mutation($app: ID!) { deployApplication(input: { applicationId: $app }) { id } }";
const DEPLOYMENT: &str = "query($id: ID!) { deployment(id: $id) { status commit failedStep failure release } }";

/// A Zpanel with one team and one project.
struct Tenant {
    app: App,
    token: String,
    project: String,
    _caddy: Caddy,
}

impl Tenant {
    async fn start(subcommand: &str, extra: &[(&str, &str)]) -> Self {
        let caddy = Caddy::start();
        let mut env = caddy.env();
        env.extend_from_slice(extra);
        let app = App::start_subcommand(subcommand, &env).await;
        let token = app.bootstrap("Acme");
        let project = app.graphql(Some(&token), CREATE_PROJECT, json!({ "name": "shop" })).await.ok();
        let project = project["createProject"]["id"].as_str().expect("project").to_owned();
        Self { app, token, project, _caddy: caddy }
    }

    async fn create(&self, name: &str, url: &str) -> Answer {
        let vars = json!({ "project": self.project, "name": name, "url": url });
        self.app.graphql(Some(&self.token), CREATE_APP, vars).await
    }

    async fn gql(&self, query: &str, variables: Value) -> Value {
        self.app.graphql(Some(&self.token), query, variables).await.ok()
    }

    async fn deploy(&self, application: &str) -> String {
        let data = self.gql(DEPLOY, json!({ "app": application })).await;
        data["deployApplication"]["id"].as_str().expect("deployment").to_owned()
    }

    /// Polls the deployment until it is finished.
    async fn finished(&self, deployment: &str) -> Value {
        self.app.finished_deployment(&self.token, DEPLOYMENT, deployment).await
    }

    /// Everything a reader of the team can see about `application` and `deployment`: the
    /// application, its events and the deployment's, the audit log, the deployment and its
    /// log; as one string, to search for what must not be there.
    async fn everything_shown(&self, application: &str, deployment: Option<&str>) -> String {
        let events = "query($s: ID!) { events(streamId: $s) { eventType payload } }";
        let audit = "{ auditLog(first: 100) { nodes { eventType streamId changes { field before after } } } }";
        let mut shown = vec![
            self.gql(APPLICATION, json!({ "id": application })).await.to_string(),
            self.gql(events, json!({ "s": format!("application-{application}") })).await.to_string(),
            self.gql(audit, json!({})).await.to_string(),
        ];
        if let Some(deployment) = deployment {
            shown.push(self.gql(events, json!({ "s": format!("deployment-{deployment}") })).await.to_string());
            shown.push(self.gql(DEPLOYMENT, json!({ "id": deployment })).await.to_string());
            shown.extend(deployment_log(&self.app.db.pool, deployment).await);
        }
        shown.join("\n")
    }
}

/// A repository outside the directory the tests allow, holding a file with a secret.
fn host_secret_repository(secret: &str) -> (TempDir, String) {
    let outside = TempDir::new();
    let repo = outside.0.join("secret.git");
    std::fs::create_dir_all(&repo).expect("repo dir");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").arg("-C").arg(&repo).args(args).output().expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("secret.txt"), secret).expect("secret");
    git(&["add", "-A"]);
    git(&["-c", "user.email=t@zpanel.invalid", "-c", "user.name=t", "commit", "-q", "-m", "secret"]);
    let commit = git(&["rev-parse", "HEAD"]).trim().to_owned();
    (outside, commit)
}

#[tokio::test]
async fn a_local_path_outside_the_allowed_roots_is_refused_at_create_and_update() {
    let tenant = Tenant::start("api", &[]).await;
    let (outside, _) = host_secret_repository("never shown");
    let secret_repo = outside.0.join("secret.git").display().to_string();
    let inside = Repo::new("allowed");
    // A link inside the allowed directory that leads out of it.
    let link = repositories_root().join(format!("link-{}", uuid::Uuid::now_v7().simple()));
    std::os::unix::fs::symlink(outside.0.join("secret.git"), &link).expect("link");
    let attempts = [
        secret_repo.clone(),
        format!("file://{secret_repo}"),
        link.display().to_string(),
        format!("file://{}/secret.txt", link.display()),
        "/etc".to_owned(),
        "/root/.ssh".to_owned(),
    ];
    for url in &attempts {
        let refused = tenant.create("probe", url).await;
        assert_eq!(refused.code(), "INVALID_INPUT", "{url}: {:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "gitUrl", "{url}");
    }

    let created = tenant.create("web", &inside.url()).await.ok();
    let application = created["createApplication"]["id"].as_str().expect("app").to_owned();
    for url in &attempts {
        let refused =
            tenant.app.graphql(Some(&tenant.token), UPDATE_URL, json!({ "id": application, "url": url })).await;
        assert_eq!(refused.code(), "INVALID_INPUT", "{url}: {:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "gitUrl", "{url}");
    }
    let unchanged = tenant.gql(APPLICATION, json!({ "id": application })).await;
    assert_eq!(unchanged["application"]["gitUrl"], inside.url());
    let _ = std::fs::remove_file(link);
}

#[tokio::test]
async fn an_installation_without_local_roots_refuses_every_local_path() {
    let tenant = Tenant::start("api", &[("ZPANEL_GIT_LOCAL_ROOTS", "")]).await;
    let repo = Repo::new("fine elsewhere");
    for url in [repo.url(), format!("file://{}", repo.url())] {
        let refused = tenant.create("web", &url).await;
        assert_eq!(refused.code(), "INVALID_INPUT", "{url}: {:?}", refused.errors);
        assert_eq!(refused.error()["extensions"]["field"], "gitUrl");
    }
    let remote = tenant.create("web", "https://git.example.com/acme/web.git").await.ok();
    assert_eq!(remote["createApplication"]["gitUrl"], "https://git.example.com/acme/web.git");
}

#[tokio::test]
async fn a_submodule_pointing_at_a_host_repository_fails_the_deployment_without_reading_it() {
    let secret = format!("HOST-SECRET-{}", uuid::Uuid::now_v7().simple());
    let (outside, secret_commit) = host_secret_repository(&secret);
    let secret_repo = outside.0.join("secret.git");
    let tenant = Tenant::start("serve", &[]).await;
    let depth = repositories_root().components().count();
    let relative = format!("{}{}", "../".repeat(depth), secret_repo.display().to_string().trim_start_matches('/'));
    for (i, url) in [secret_repo.display().to_string(), format!("file://{}", secret_repo.display()), relative]
        .into_iter()
        .enumerate()
    {
        // Were the submodule fetched, the build would serve the host's file.
        let repo = Repo::new("tenant");
        repo.commit_app("tenant", "COPY vendor/secret.txt /www/index.html");
        repo.commit_submodule("vendor", &url, &secret_commit);
        let created = tenant.create(&format!("web{i}"), &repo.url()).await.ok();
        let application = created["createApplication"]["id"].as_str().expect("app").to_owned();
        let deployment = tenant.deploy(&application).await;
        let finished = tenant.finished(&deployment).await;
        assert_eq!(finished["status"], "FAILED", "{url}: {finished}");
        assert_eq!(finished["failedStep"], "clone", "{url}: {finished}");
        let failure = finished["failure"].as_str().unwrap_or_default();
        assert!(failure.contains("submodule \"vendor\" is refused"), "{url}: {failure}");
        let shown = tenant.everything_shown(&application, Some(&deployment)).await;
        assert!(!shown.contains(&secret), "{url}: the host's secret was shown");
    }
}

#[tokio::test]
async fn a_tenants_clone_never_uses_the_workers_own_credentials_and_its_own_are_never_shown() {
    // The worker's user can read the repository with the credentials in its ~/.netrc.
    let served = TempDir::new();
    let repo = Repo::new("private");
    repo.export_bare(&served.0.join("app.git"));
    let (host_login, tenant_login) = ("worker", format!("tenant-token-{}", uuid::Uuid::now_v7().simple()));
    let server =
        GitHttpServer::start(served.0.clone(), &["worker:host-password", &format!("bot:{tenant_login}")]).await;
    let home = TempDir::new();
    std::fs::write(home.0.join(".netrc"), format!("machine 127.0.0.1 login {host_login} password host-password\n"))
        .expect("netrc");
    let home_dir = home.0.display().to_string();
    ensure_base_image();
    let tenant = Tenant::start("serve", &[("HOME", &home_dir)]).await;
    let url = format!("{}/app.git", server.url);

    let created = tenant.create("web", &url).await.ok();
    let application = created["createApplication"]["id"].as_str().expect("app").to_owned();
    let deployment = tenant.deploy(&application).await;
    let finished = tenant.finished(&deployment).await;
    assert_eq!(finished["status"], "FAILED", "{finished}");
    assert_eq!(finished["failedStep"], "resolve", "{finished}");
    assert!(
        !server.authorizations().contains(&GitHttpServer::basic("worker:host-password")),
        "the worker's ~/.netrc answered for the tenant"
    );

    // With credentials of its own, written into the URL, the tenant's clone gets in; they
    // are sealed, and shown nowhere.
    let with_login = url.replacen("http://", &format!("http://bot:{tenant_login}@"), 1);
    let updated = tenant.gql(UPDATE_URL, json!({ "id": application, "url": with_login })).await;
    let masked = url.replacen("http://", "http://***@", 1);
    assert_eq!(updated["updateApplication"]["gitUrl"], masked.as_str());
    let deployment = tenant.deploy(&application).await;
    let finished = tenant.finished(&deployment).await;
    assert_eq!(finished["commit"].as_str().map(str::len), Some(40), "the tenant's credentials worked: {finished}");
    assert!(server.authorizations().contains(&GitHttpServer::basic(&format!("bot:{tenant_login}"))));
    let shown = tenant.everything_shown(&application, Some(&deployment)).await;
    assert!(!shown.contains(&tenant_login), "the tenant's credentials were shown: {shown}");
    assert!(shown.contains(&masked), "the URL is still shown, masked");

    // Given back as read, the URL keeps the credentials.
    let again = tenant.gql(UPDATE_URL, json!({ "id": application, "url": masked })).await;
    assert_eq!(again["updateApplication"]["gitUrl"], masked.as_str());
    let deployment = tenant.deploy(&application).await;
    let finished = tenant.finished(&deployment).await;
    assert_eq!(finished["commit"].as_str().map(str::len), Some(40), "{finished}");
    assert!(!tenant.everything_shown(&application, Some(&deployment)).await.contains(&tenant_login));

    // Whoever may change the URL cannot send the stored credentials to a host of theirs.
    let elsewhere =
        tenant.gql(UPDATE_URL, json!({ "id": application, "url": "http://***@attacker.example/x.git" })).await;
    assert_eq!(elsewhere["updateApplication"]["gitUrl"], "http://attacker.example/x.git", "credentials dropped");
    remove_application(&application);
}
