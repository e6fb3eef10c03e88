//! The production shape (`docker-compose.yml`, `Dockerfile`, `.dockerignore`) as an operator
//! meets it: the compose file is valid, every service has a health check, every `ZPANEL_*`
//! variable it sets is one the binary reads, the image's build context leaves data out, and
//! Caddy, started as the compose file starts it, keeps Zpanel's routes across a restart.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zpanel_tests::TempDir;
use zpanel_tests::deploy::free_port;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `docker-compose config`: the file with its anchors merged and variables filled in, as
/// Compose itself reads it.
fn resolved_compose() -> String {
    let output = Command::new("docker-compose")
        .arg("--project-directory")
        .arg(root())
        .arg("--file")
        .arg(root().join("docker-compose.yml"))
        .arg("config")
        .env("POSTGRES_PASSWORD", "not-a-real-password")
        .env("ZPANEL_MASTER_KEY", "bm90LWEtcmVhbC1rZXktbm90LWEtcmVhbC1rZXktMzI=")
        .stdin(Stdio::null())
        .output()
        .expect("docker-compose is installed (scripts/test installs Debian's package)");
    assert!(output.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The services of a resolved compose file, each with its lines.
fn services(resolved: &str) -> Vec<(String, Vec<String>)> {
    let mut services: Vec<(String, Vec<String>)> = Vec::new();
    let mut inside = false;
    for line in resolved.lines() {
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            inside = line.trim_end() == "services:";
            continue;
        }
        if !inside {
            continue;
        }
        if indent == 2 && line.trim_end().ends_with(':') {
            services.push((line.trim().trim_end_matches(':').to_owned(), Vec::new()));
        } else if let Some((_, lines)) = services.last_mut() {
            lines.push(line.to_owned());
        }
    }
    services
}

/// The `ZPANEL_*` variables the binary reads: those its `--help` names, for each subcommand a
/// service runs.
fn variables_the_binary_reads() -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for subcommand in ["serve", "api", "worker", "health"] {
        let output = Command::new(zpanel_tests::zpanel_bin())
            .args([subcommand, "--help"])
            .stdin(Stdio::null())
            .output()
            .expect("runs zpanel");
        assert!(output.status.success(), "zpanel {subcommand} --help failed");
        let help = String::from_utf8_lossy(&output.stdout);
        for piece in help.split("[env: ").skip(1) {
            let name: String =
                piece.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit()).collect();
            known.insert(name);
        }
    }
    assert!(known.contains("ZPANEL_DATABASE_URL"), "the help names the variables: {known:?}");
    known
}

#[test]
fn the_compose_file_is_valid_and_every_service_has_a_health_check() {
    let resolved = resolved_compose();
    let services = services(&resolved);
    let names: Vec<&str> = services.iter().map(|(name, _)| name.as_str()).collect();
    for wanted in ["postgres", "kafka", "caddy", "engine-logs", "zpanel", "worker"] {
        assert!(names.contains(&wanted), "service {wanted} is missing: {names:?}");
    }
    for (name, lines) in &services {
        assert!(
            lines.iter().any(|l| l.trim_end() == "    healthcheck:"),
            "service {name} has no health check:\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn every_zpanel_variable_the_compose_file_sets_is_one_the_binary_reads() {
    let resolved = resolved_compose();
    let known = variables_the_binary_reads();
    let mut set = BTreeSet::new();
    for line in resolved.lines() {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("ZPANEL_")
            && let Some((name, _)) = rest.split_once(':')
        {
            set.insert(format!("ZPANEL_{name}"));
        }
    }
    assert!(set.contains("ZPANEL_DATABASE_URL") && set.contains("ZPANEL_WORKER_LISTEN"), "read {set:?}");
    let unknown: Vec<&String> = set.difference(&known).collect();
    assert!(unknown.is_empty(), "the compose file sets variables the binary does not read: {unknown:?}");
}

#[test]
fn the_api_never_gets_the_engine_socket_and_only_the_workers_reach_caddy() {
    let resolved = resolved_compose();
    let services = services(&resolved);
    let lines = |wanted: &str| {
        services.iter().find(|(name, _)| name == wanted).map(|(_, lines)| lines.join("\n")).expect("service")
    };
    let api = lines("zpanel");
    assert!(!api.contains("docker.sock"), "the API is internet-facing: no engine socket\n{api}");
    assert!(!api.contains("ZPANEL_CADDY_ADMIN"), "Caddy's admin API is on the host's loopback, out of the API's reach");
    assert!(api.contains("ZPANEL_DOCKER_HOST: tcp://engine-logs:2375"), "containerLogs goes through the proxy\n{api}");
    let proxy = lines("engine-logs");
    assert!(!proxy.contains("allowPOST") && proxy.contains("docker.sock:ro"), "the proxy only reads\n{proxy}");
    assert!(lines("worker").contains("ZPANEL_CADDY_ADMIN: http://127.0.0.1:2019"));
}

#[test]
fn the_image_build_context_leaves_data_directories_and_keys_out() {
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore exists");
    let lines: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    // Everything is left out unless named: a new folder with a key in it stays out too.
    assert_eq!(lines.first(), Some(&"*"), "the context is an allow-list: {lines:?}");
    assert!(lines.contains(&"**/zpanel-data/"), "a data directory inside an included folder stays out");
    assert!(!lines.iter().any(|l| l.contains("zpanel-data") && l.starts_with('!')), "no data directory is let in");
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY") && !l.contains("--from")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).filter(|w| !w.starts_with("--")).collect();
        // The last word is the destination.
        for source in words.iter().take(words.len().saturating_sub(1)) {
            let name = source.trim_end_matches('/');
            assert!(
                *source == "."
                    || lines.contains(&format!("!{name}/").as_str())
                    || lines.contains(&format!("!{name}").as_str()),
                "the Dockerfile copies {source}, which the context leaves out"
            );
        }
    }
}

#[test]
fn the_health_command_fails_when_nothing_answers_and_names_the_address() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let output = Command::new(zpanel_tests::zpanel_bin())
        .args(["health", &url])
        .stdin(Stdio::null())
        .output()
        .expect("runs zpanel");
    assert!(!output.status.success(), "nothing listens on {url}");
    assert!(String::from_utf8_lossy(&output.stderr).contains(&url), "the error names the address");
}

/// Caddy's admin API answers `GET path` with this body.
async fn admin_get(admin: &str, path: &str) -> Option<String> {
    let response = reqwest::get(format!("{admin}{path}")).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

fn start_caddy(dir: &TempDir, admin_port: u16) -> std::process::Child {
    // As the compose file runs it: `caddy run --resume`, the admin address from CADDY_ADMIN
    // (Debian's older Caddy reads it from a bootstrap file instead, which `--resume` overrides
    // once a configuration was saved: the same behaviour).
    let bootstrap = dir.0.join("bootstrap.json");
    std::fs::write(&bootstrap, format!(r#"{{"admin":{{"listen":"127.0.0.1:{admin_port}"}}}}"#)).expect("bootstrap");
    zpanel_tests::deploy::caddy_in(&dir.0)
        .args(["run", "--resume", "--config"])
        .arg(&bootstrap)
        .env("CADDY_ADMIN", format!("127.0.0.1:{admin_port}"))
        .spawn()
        .expect("caddy is installed (scripts/test installs it)")
}

async fn wait_for_admin(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_get(admin, "/config/").await.is_none() {
        assert!(Instant::now() < deadline, "caddy's admin API did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn caddy_run_as_the_compose_file_runs_it_keeps_zpanels_routes_across_a_restart() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).expect("compose file");
    assert!(compose.contains(r#"command: ["caddy", "run", "--resume"]"#), "the compose file resumes Caddy's config");
    let dir = TempDir::new();
    let admin_port = free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut caddy = start_caddy(&dir, admin_port);
    wait_for_admin(&admin).await;
    let proxy = zpanel_workers::proxy::Proxy::new(&admin, &listen).expect("proxy");
    proxy.ensure_server().await.expect("zpanel's server");
    let application = uuid::Uuid::now_v7();
    let domain = format!("app-{}.example.test", application.simple());
    proxy.route(application, std::slice::from_ref(&domain), "127.0.0.1:9").await.expect("a route");

    caddy.kill().expect("stops caddy");
    caddy.wait().expect("caddy stopped");
    let mut caddy = start_caddy(&dir, admin_port);
    wait_for_admin(&admin).await;
    let config = admin_get(&admin, "/config/").await.expect("config");
    let _ = caddy.kill();
    let _ = caddy.wait();
    assert!(config.contains(&domain), "the route is back at once, before any route sync: {config}");
}
