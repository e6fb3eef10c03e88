//! Property tests for the validated value types: every valid input parses and round-trips (through
//! `to_string` and through JSON), every input that breaks a type's rule is refused (by `parse` and
//! by serde alike), and no input whatsoever makes a parser panic.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::{Debug, Display};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use zpanel_domain::values::{
    DomainName, EnvKey, EnvironmentName, GitRef, GitUrl, HealthPath, Host, ImageRef, Name, Port, RepoPath, UnixUser,
    ValueError,
};

/// What the string value types have in common.
trait StringValue: FromStr<Err = ValueError> + Display + Clone + PartialEq + Debug + Serialize + DeserializeOwned {}
impl<T> StringValue for T where
    T: FromStr<Err = ValueError> + Display + Clone + PartialEq + Debug + Serialize + DeserializeOwned
{
}

/// `raw` parses, `parse(to_string)` gives the same value, and so does a JSON round trip.
fn round_trips<T: StringValue>(raw: &str) -> Result<T, TestCaseError> {
    let value = raw.parse::<T>().map_err(|e| TestCaseError::fail(format!("{raw:?} was rejected: {e}")))?;
    prop_assert_eq!(value.to_string().parse::<T>(), Ok(value.clone()));
    let json = serde_json::to_string(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = serde_json::from_str::<T>(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, &value);
    Ok(value)
}

/// `raw` is refused by `parse` and by deserialization.
fn refused<T: StringValue>(raw: &str) -> Result<(), TestCaseError> {
    prop_assert!(raw.parse::<T>().is_err(), "{:?} was accepted as {}", raw, std::any::type_name::<T>());
    prop_assert!(serde_json::from_value::<T>(serde_json::Value::String(raw.to_owned())).is_err());
    Ok(())
}

/// On any input: no panic, serde agrees with `parse`, and what parses re-parses to itself.
fn consistent<T: StringValue>(raw: &str) -> Result<(), TestCaseError> {
    let parsed = raw.parse::<T>();
    let deserialized = serde_json::from_value::<T>(serde_json::Value::String(raw.to_owned()));
    prop_assert_eq!(parsed.is_ok(), deserialized.is_ok(), "{:?}", raw);
    if let Ok(value) = parsed {
        prop_assert_eq!(value.to_string().parse::<T>(), Ok(value.clone()));
        prop_assert_eq!(deserialized.ok(), Some(value));
    }
    Ok(())
}

/// `s` with `c` inserted before its `at`-th character.
fn insert(s: &str, at: Index, c: impl Display) -> String {
    let chars: Vec<char> = s.chars().collect();
    let at = at.index(chars.len() + 1);
    let mut out: String = chars[..at].iter().collect();
    out.push_str(&c.to_string());
    out.extend(&chars[at..]);
    out
}

const SHELL_METACHARACTERS: &[char] = &['$', '`', ';', '&', '|', '<', '>', '(', ')', '\\', '\'', '"', '\n'];

fn metacharacter() -> impl Strategy<Value = char> {
    prop::sample::select(SHELL_METACHARACTERS)
}

/// Any control character (Unicode general category Cc, C0 and C1 alike).
fn control() -> impl Strategy<Value = char> {
    "\\p{Cc}".prop_map(|s| s.chars().next().unwrap_or('\0'))
}

/// Any whitespace character (Unicode White_Space).
fn whitespace() -> impl Strategy<Value = char> {
    "\\s".prop_map(|s| s.chars().next().unwrap_or(' '))
}

/// Metacharacters, control characters and whitespace.
fn forbidden() -> impl Strategy<Value = char> {
    prop_oneof![metacharacter(), control(), whitespace()]
}

/// Strings made of the characters parsers care about, so the odd corners get visited often.
fn tricky() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(
                "aZ09-_.:/@*~^?[]{}#%+=!,$`;&|<>()\\'\"\n\t é\u{85}\u{a0}\u{9b}".chars().collect::<Vec<_>>()
            ),
            1 => any::<char>(),
        ],
        0..40,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn hostname() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..4).prop_map(|labels| labels.join("."))
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b)).to_string()),
        any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s)).to_string()),
    ]
}

fn url_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9_.~%+-]{1,12}", 0..4)
        .prop_filter("no '..' segment", |segments| segments.iter().all(|s| s != ".."))
        .prop_map(|segments| segments.join("/"))
}

fn git_url() -> impl Strategy<Value = String> {
    let user = "[a-z_][a-z0-9_.-]{0,8}";
    prop_oneof![
        (prop::bool::ANY, hostname(), prop::option::of(1u16..), url_path()).prop_map(|(tls, host, port, path)| {
            let scheme = if tls { "https" } else { "http" };
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{host}{port}/{path}")
        }),
        (user, hostname(), prop::option::of(1u16..), url_path()).prop_map(|(user, host, port, path)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("ssh://{user}@{host}{port}/{path}")
        }),
        (user, hostname(), "[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_.-]{1,12}){0,3}")
            .prop_map(|(user, host, path)| format!("{user}@{host}:{path}")),
        (prop::bool::ANY, url_path())
            .prop_map(|(file, path)| { if file { format!("file:///{path}") } else { format!("/{path}") } }),
    ]
}

fn git_ref() -> impl Strategy<Value = String> {
    let component = "[A-Za-z0-9_é中]([A-Za-z0-9_é中-]{0,8}(\\.[A-Za-z0-9_-]{1,6})?)?";
    prop_oneof![
        prop::collection::vec(component, 1..5)
            .prop_filter("no '.lock' component", |parts| { parts.iter().all(|p| !p.ends_with(".lock")) })
            .prop_map(|parts| parts.join("/")),
        "[0-9a-f]{40}",
    ]
}

fn image_ref() -> impl Strategy<Value = String> {
    let component = "[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+){0,2}";
    let registry = prop_oneof![
        Just(String::new()),
        (hostname(), prop::option::of(1u16..)).prop_map(|(host, port)| {
            // A registry is told from a path by a '.' or a port (or being `localhost`).
            match port {
                Some(port) => format!("{host}:{port}/"),
                None => format!("{host}.io/"),
            }
        }),
        Just("localhost/".to_owned()),
    ];
    (
        registry,
        prop::collection::vec(component, 1..4),
        prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"),
        prop::option::of("[0-9a-f]{64}"),
    )
        // Like Docker, the parser reads a first component with a '.' as a registry.
        .prop_filter("no registry-like first path component", |(registry, path, _, _)| {
            !registry.is_empty() || path.len() == 1 || !path[0].contains('.')
        })
        .prop_map(|(registry, path, tag, digest)| {
            let tag = tag.map(|t| format!(":{t}")).unwrap_or_default();
            let digest = digest.map(|d| format!("@sha256:{d}")).unwrap_or_default();
            format!("{registry}{}{tag}{digest}", path.join("/"))
        })
}

fn domain_name() -> impl Strategy<Value = String> {
    (prop::bool::ANY, prop::collection::vec(label(), 1..4), "[a-z][a-z0-9-]{0,10}[a-z0-9]").prop_map(
        |(wildcard, labels, tld)| {
            let wildcard = if wildcard { "*." } else { "" };
            format!("{wildcard}{}.{tld}", labels.join("."))
        },
    )
}

fn env_key() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,254}"
}

fn health_path() -> impl Strategy<Value = String> {
    // Printable ASCII without space, '#' and shell metacharacters; no '..' segment.
    "/[A-Za-z0-9._~!*+,=:@%&?/-]{0,200}"
        .prop_filter("no '..' segment", |p| !p.split(['/', '?']).any(|segment| segment == ".."))
}

fn repo_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9._@+=,:-]{1,10}", 1..5)
        .prop_filter("relative, no '..', no leading '-'", |segments| {
            segments.iter().all(|s| s != "..") && !segments[0].starts_with('-')
        })
        .prop_map(|segments| segments.join("/"))
}

fn unix_user() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_-]{0,31}"
}

fn name() -> impl Strategy<Value = String> {
    "[^\\s\\p{Cc}]([^\\p{Cc}]{0,98}[^\\s\\p{Cc}])?"
}

fn environment_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // (1) + (4): valid inputs parse and round-trip through to_string and JSON.

    #[test]
    fn valid_git_urls_round_trip(raw in git_url()) {
        round_trips::<GitUrl>(&raw)?;
    }

    #[test]
    fn valid_git_refs_round_trip(raw in git_ref()) {
        round_trips::<GitRef>(&raw)?;
    }

    #[test]
    fn valid_image_refs_round_trip(raw in image_ref()) {
        round_trips::<ImageRef>(&raw)?;
    }

    #[test]
    fn valid_domain_names_round_trip_lowercased(raw in domain_name()) {
        let value = round_trips::<DomainName>(&raw)?;
        prop_assert_eq!(round_trips::<DomainName>(&raw.to_ascii_uppercase())?, value.clone());
        prop_assert_eq!(round_trips::<DomainName>(&format!("{raw}."))?, value);
    }

    #[test]
    fn valid_hosts_round_trip(raw in prop_oneof![hostname(), ip()]) {
        round_trips::<Host>(&raw)?;
    }

    #[test]
    fn valid_env_keys_round_trip(raw in env_key()) {
        round_trips::<EnvKey>(&raw)?;
    }

    #[test]
    fn valid_health_paths_round_trip(raw in health_path()) {
        round_trips::<HealthPath>(&raw)?;
    }

    #[test]
    fn valid_repo_paths_round_trip(raw in repo_path()) {
        round_trips::<RepoPath>(&raw)?;
    }

    #[test]
    fn valid_unix_users_round_trip(raw in unix_user()) {
        round_trips::<UnixUser>(&raw)?;
    }

    #[test]
    fn valid_names_round_trip(raw in name()) {
        round_trips::<Name>(&raw)?;
    }

    #[test]
    fn valid_environment_names_round_trip(raw in environment_name()) {
        round_trips::<EnvironmentName>(&raw)?;
    }

    #[test]
    fn ports_are_exactly_1_to_65535(n in any::<u32>()) {
        let valid = (1..=65535).contains(&n);
        let parsed = Port::parse(&n.to_string());
        prop_assert_eq!(parsed.is_ok(), valid);
        prop_assert_eq!(serde_json::from_value::<Port>(serde_json::json!(n)).ok(), parsed.clone().ok());
        if let Ok(port) = parsed {
            prop_assert_eq!(u32::from(port.get()), n);
            prop_assert_eq!(Port::parse(&port.to_string()), Ok(port));
            let json = serde_json::to_value(port).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(json, serde_json::json!(n));
        }
    }

    #[test]
    fn ports_refuse_negative_numbers_and_padding(n in any::<i64>(), pad in whitespace()) {
        let raw = n.to_string();
        if n < 0 {
            prop_assert!(Port::parse(&raw).is_err());
            prop_assert!(serde_json::from_value::<Port>(serde_json::json!(n)).is_err());
        }
        let padded = [format!("{pad}{raw}"), format!("{raw}{pad}")];
        for padded in padded {
            prop_assert!(Port::parse(&padded).is_err(), "{:?}", padded);
        }
    }

    // (2): what a type's rule forbids is refused, wherever it appears.

    #[test]
    fn git_refs_refuse_metacharacters_anywhere(raw in git_ref(), c in metacharacter(), at in any::<Index>()) {
        refused::<GitRef>(&insert(&raw, at, c))?;
    }

    #[test]
    fn git_refs_refuse_control_characters_and_ascii_whitespace(
        raw in git_ref(),
        c in prop_oneof![control(), prop::sample::select(vec![' ', '\t', '\r', '\x0b', '\x0c'])],
        at in any::<Index>(),
    ) {
        refused::<GitRef>(&insert(&raw, at, c))?;
    }

    #[test]
    fn git_refs_refuse_a_leading_dash(raw in git_ref()) {
        refused::<GitRef>(&format!("-{raw}"))?;
    }

    #[test]
    fn git_urls_refuse_forbidden_characters_anywhere(raw in git_url(), c in forbidden(), at in any::<Index>()) {
        refused::<GitUrl>(&insert(&raw, at, c))?;
    }

    #[test]
    fn git_urls_refuse_remote_helper_syntax_anywhere(raw in git_url(), at in any::<Index>()) {
        refused::<GitUrl>(&insert(&raw, at, "::"))?;
    }

    #[test]
    fn git_urls_refuse_a_leading_dash(raw in git_url()) {
        refused::<GitUrl>(&format!("-{raw}"))?;
    }

    #[test]
    fn image_refs_refuse_forbidden_characters_anywhere(raw in image_ref(), c in forbidden(), at in any::<Index>()) {
        refused::<ImageRef>(&insert(&raw, at, c))?;
    }

    #[test]
    fn image_refs_refuse_a_leading_dash(raw in image_ref()) {
        refused::<ImageRef>(&format!("-{raw}"))?;
    }

    #[test]
    fn domain_names_refuse_forbidden_characters_anywhere(raw in domain_name(), c in forbidden(), at in any::<Index>()) {
        refused::<DomainName>(&insert(&raw, at, c))?;
    }

    #[test]
    fn domain_names_refuse_a_leading_dash(raw in domain_name()) {
        refused::<DomainName>(&format!("-{raw}"))?;
    }

    #[test]
    fn hosts_refuse_forbidden_characters_anywhere(raw in hostname(), c in forbidden(), at in any::<Index>()) {
        refused::<Host>(&insert(&raw, at, c))?;
    }

    #[test]
    fn hosts_refuse_a_leading_dash(raw in prop_oneof![hostname(), ip()]) {
        refused::<Host>(&format!("-{raw}"))?;
    }

    #[test]
    fn env_keys_refuse_forbidden_characters_and_a_leading_dash(
        raw in env_key(), c in prop_oneof![forbidden(), Just('-')], at in any::<Index>(),
    ) {
        refused::<EnvKey>(&insert(&raw, at, c))?;
    }

    #[test]
    fn unix_users_refuse_forbidden_characters_and_a_leading_dash(
        raw in unix_user(), c in forbidden(), at in any::<Index>(),
    ) {
        refused::<UnixUser>(&insert(&raw, at, c))?;
        refused::<UnixUser>(&format!("-{raw}"))?;
    }

    #[test]
    fn environment_names_refuse_forbidden_characters_and_a_leading_dash(
        raw in environment_name(), c in forbidden(), at in any::<Index>(),
    ) {
        refused::<EnvironmentName>(&insert(&raw, at, c))?;
        refused::<EnvironmentName>(&format!("-{raw}"))?;
    }

    #[test]
    fn health_paths_refuse_whitespace_and_control_characters(
        raw in health_path(), c in prop_oneof![control(), whitespace()], at in any::<Index>(),
        meta in prop::sample::select(&['$', '`', ';', '|', '<', '>', '(', ')', '\\', '\'', '"'][..]),
    ) {
        refused::<HealthPath>(&insert(&raw, at, c))?;
        refused::<HealthPath>(&format!("{raw}{meta}"))?;
    }

    #[test]
    fn repo_paths_refuse_control_characters_a_leading_dash_and_climbing_out(
        raw in repo_path(), c in control(), at in any::<Index>(), meta in metacharacter(),
    ) {
        refused::<RepoPath>(&insert(&raw, at, c))?;
        refused::<RepoPath>(&insert(&raw, at, meta))?;
        refused::<RepoPath>(&insert(&raw, at, ' '))?;
        refused::<RepoPath>(&format!("-{raw}"))?;
        refused::<RepoPath>(&format!("{raw}/../x"))?;
        refused::<RepoPath>(&format!("../{raw}"))?;
        refused::<RepoPath>(&format!("/{raw}"))?;
    }

    #[test]
    fn names_refuse_control_characters_and_surrounding_whitespace(
        raw in name(), c in control(), space in whitespace(), at in any::<Index>(),
    ) {
        refused::<Name>(&insert(&raw, at, c))?;
        refused::<Name>(&format!("{space}{raw}"))?;
        refused::<Name>(&format!("{raw}{space}"))?;
    }

    // (3): no input makes a parser panic; serde agrees with parse; what parses re-parses to itself.

    #[test]
    fn parsers_never_panic_and_agree_with_serde(raw in prop_oneof![any::<String>(), tricky()]) {
        consistent::<GitUrl>(&raw)?;
        consistent::<GitRef>(&raw)?;
        consistent::<ImageRef>(&raw)?;
        consistent::<DomainName>(&raw)?;
        consistent::<Host>(&raw)?;
        consistent::<EnvKey>(&raw)?;
        consistent::<HealthPath>(&raw)?;
        consistent::<RepoPath>(&raw)?;
        consistent::<UnixUser>(&raw)?;
        consistent::<Name>(&raw)?;
        consistent::<EnvironmentName>(&raw)?;
        let _ = Port::parse(&raw);
    }

    #[test]
    fn parsers_never_panic_on_near_valid_input(
        raw in prop_oneof![git_url(), git_ref(), image_ref(), domain_name(), hostname()],
        junk in tricky(),
        at in any::<Index>(),
    ) {
        let raw = insert(&raw, at, junk);
        consistent::<GitUrl>(&raw)?;
        consistent::<GitRef>(&raw)?;
        consistent::<ImageRef>(&raw)?;
        consistent::<DomainName>(&raw)?;
        consistent::<Host>(&raw)?;
    }

    #[test]
    fn accepted_git_refs_and_urls_never_hold_a_metacharacter_or_control_character(
        raw in prop_oneof![any::<String>(), tricky()],
    ) {
        let dangerous = |s: &str| {
            s.starts_with('-') || s.chars().any(|c| c.is_control() || SHELL_METACHARACTERS.contains(&c))
        };
        if let Ok(r) = GitRef::parse(&raw) {
            prop_assert!(!dangerous(r.as_str()), "{:?}", r);
        }
        if let Ok(u) = GitUrl::parse(&raw) {
            prop_assert!(!dangerous(u.as_str()) && !u.as_str().contains("::"), "{:?}", u);
            prop_assert!(!u.as_str().chars().any(char::is_whitespace), "{:?}", u);
        }
    }
}
