//! Configuration loading: TOML file, then `MESHBRIDGE_*` environment overrides, then a
//! validation that reports every problem at once.
//!
//! Unknown fields are rejected: they are collected while deserializing (rather than failing
//! on the first one) so that they are reported together with invalid values.
//! Environment overrides name a field path with `__` between levels:
//! `MESHBRIDGE_ADMIN__LISTEN=127.0.0.1:9901` sets `admin.listen`. The value is read as a
//! TOML value when it parses as one (numbers, booleans, arrays), else as a string. A
//! top-level variable that names no field is ignored (another tool's); the command line's
//! own variables ([`NOT_OVERRIDES`]) never override; a problem with an overridden value
//! names its variable.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One problem in a configuration, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects problems during validation.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Record a problem unless `ok`.
    pub fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.push(field, message);
        }
    }

    /// Check that `value` parses as a socket address.
    pub fn socket_addr(&mut self, field: &str, value: &str) {
        if value.parse::<std::net::SocketAddr>().is_err() {
            self.push(
                field,
                format!("{value:?} is not an address like 127.0.0.1:8443"),
            );
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Take the problems of a section validated on its own, under `prefix.` (its name in
    /// this file).
    pub fn nest(&mut self, prefix: &str, inner: Problems) {
        for pr in inner.0 {
            self.push(format!("{prefix}.{}", pr.field), pr.message);
        }
    }
}

/// Every problem found in one configuration source.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A role's configuration.
pub trait RoleConfig: DeserializeOwned + Serialize {
    /// Every semantic problem, each naming its field.
    fn validate(&self, problems: &mut Problems);
}

const ENV_PREFIX: &str = "MESHBRIDGE_";

/// Load a config from a file (or from an empty document when `path` is `None`), apply
/// environment overrides, and validate.
pub fn load<T: RoleConfig>(path: Option<&Path>) -> Result<T, ConfigError> {
    let (name, text) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                source_name: p.display().to_string(),
                problems: vec![Problem {
                    field: "(file)".into(),
                    message: format!("cannot read: {e}"),
                }],
            })?;
            (p.display().to_string(), text)
        }
        None => ("(defaults)".to_string(), String::new()),
    };
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    parse_with_env(&name, &text, &env)
}

/// Parse TOML text with the given environment overrides (testable without the process env).
pub fn parse_with_env<T: RoleConfig>(
    name: &str,
    text: &str,
    env: &[(String, String)],
) -> Result<T, ConfigError> {
    let err = |problems| ConfigError {
        source_name: name.to_string(),
        problems,
    };
    let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        err(vec![Problem {
            field: "(syntax)".into(),
            message: e.to_string(),
        }])
    })?;
    let mut problems = Problems::default();
    // (field path, variable) of each override applied.
    let mut from_env: Vec<(String, &str)> = Vec::new();
    for (key, value) in env {
        let Some(path) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NOT_OVERRIDES.contains(&path) {
            continue;
        }
        if !path.contains("__") && !doc.contains_key(&path.to_ascii_lowercase()) {
            // A top-level variable the file leaves out: an override only if it names a
            // field of this role (else another tool's). Tried on a copy: some roles' types
            // refuse unknown fields outright.
            let mut trial = doc.clone();
            if let Some(field) = apply_env(&mut trial, path, value, &mut problems)
                && names_a_field::<T>(&trial, &field)
            {
                doc = trial;
                from_env.push((field, key));
            }
            continue;
        }
        if let Some(field) = apply_env(&mut doc, path, value, &mut problems) {
            from_env.push((field, key));
        }
    }
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = serde_ignored::deserialize(toml::Value::Table(doc), |p| {
        unknown.push(p.to_string());
    });
    for field in unknown {
        problems.push(field, "unknown field");
    }
    if let Ok(cfg) = &parsed {
        cfg.validate(&mut problems);
    } else if let Err(e) = &parsed {
        problems.push("(value)", e.to_string());
    }
    // A bad value that came from the environment says so: the file may be fine.
    for problem in &mut problems.0 {
        if let Some((_, var)) = from_env
            .iter()
            .find(|(f, _)| problem.field == *f || problem.message.contains(&format!("`{f}`")))
        {
            problem
                .message
                .push_str(&format!(" (set by {var} in the environment)"));
        }
    }
    match parsed {
        Ok(cfg) if problems.is_empty() => Ok(cfg),
        _ => Err(err(problems.0)),
    }
}

/// Whether the top-level `field` of `doc` is one `T` knows: `T` does not report it as
/// unknown, whether it collects unknown fields or refuses them.
fn names_a_field<T: RoleConfig>(doc: &toml::Table, field: &str) -> bool {
    let mut unknown = false;
    let parsed: Result<T, _> = serde_ignored::deserialize(toml::Value::Table(doc.clone()), |p| {
        unknown |= p.to_string() == field;
    });
    let refused = parsed
        .err()
        .is_some_and(|e| e.to_string().contains(&format!("unknown field `{field}`")));
    !unknown && !refused
}

/// `MESHBRIDGE_*` variables of the command line itself (`--config`, `ctl --registry`,
/// `ctl --tls-dir`, logging, the allocator, the parent watch): never config overrides.
/// `MESHBRIDGE_REGISTRY`, exported for `ctl`, would otherwise replace an agent's
/// `registry` list.
const NOT_OVERRIDES: &[&str] = &[
    "CONFIG",
    "REGISTRY",
    "TLS_DIR",
    "LOG",
    "LOG_FORMAT",
    "MALLOC_TUNING",
    "EXIT_WITH_PARENT",
];

/// Apply one override (`path` without the prefix, `__` between levels) to `doc`; the
/// field path it set (`admin.listen`), or `None` when it could not be applied.
fn apply_env(
    doc: &mut toml::Table,
    path: &str,
    value: &str,
    problems: &mut Problems,
) -> Option<String> {
    let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
    let field = parts.join(".");
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut table = doc;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            table.insert(part.clone(), parsed);
            return Some(field);
        }
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        match entry {
            toml::Value::Table(t) => table = t,
            _ => {
                problems.push(
                    format!("{ENV_PREFIX}{path}"),
                    format!("{part} is not a table"),
                );
                return None;
            }
        }
    }
    None
}

/// The effective configuration as TOML, for logs and `/config_dump`.
pub fn effective<T: Serialize>(cfg: &T) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("# cannot render config: {e}"))
}

/// A configuration as the TOML text of its file: how the demo and the tests write the
/// files of the processes they start, from typed values rather than formatted text.
pub fn render<T: Serialize>(cfg: &T) -> Result<String, toml::ser::Error> {
    toml::to_string(cfg)
}

/// [`render`] `cfg` into the file `path`; errors name the file.
pub fn write<T: Serialize>(path: &Path, cfg: &T) -> std::io::Result<()> {
    let named = |what: &str, e: &dyn fmt::Display| {
        std::io::Error::other(format!("{what} {}: {e}", path.display()))
    };
    let text = render(cfg).map_err(|e| named("rendering", &e))?;
    std::fs::write(path, text).map_err(|e| named("writing", &e))
}

/// Resolve a possibly relative path against the config file's directory.
pub fn relative_to(base: Option<&Path>, p: &Path) -> PathBuf {
    match base.and_then(Path::parent) {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Admin {
        listen: String,
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Sample {
        site: String,
        lease_ttl_secs: u64,
        admin: Admin,
        #[serde(default)]
        workers: usize,
        #[serde(default)]
        registry: Vec<String>,
    }

    impl RoleConfig for Sample {
        fn validate(&self, p: &mut Problems) {
            p.check(!self.site.is_empty(), "site", "must not be empty");
            p.check(
                self.lease_ttl_secs > 0,
                "lease_ttl_secs",
                "must be more than 0",
            );
            p.socket_addr("admin.listen", &self.admin.listen);
        }
    }

    #[test]
    fn unknown_field_and_two_invalid_values_are_all_reported_at_once() {
        let text =
            "site = \"\"\nlease_ttl_secs = 0\ncolour = \"red\"\n[admin]\nlisten = \"nowhere\"\n";
        let err = parse_with_env::<Sample>("site.toml", text, &[]).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["colour", "site", "lease_ttl_secs", "admin.listen"],
            "{err}"
        );
        let text = err.to_string();
        assert!(text.starts_with("site.toml: 4 problems"), "{text}");
        assert!(text.contains("colour: unknown field"), "{text}");
    }

    #[test]
    fn env_overrides_nested_fields() {
        let text = "site = \"east\"\nlease_ttl_secs = 5\n[admin]\nlisten = \"bad\"\n";
        let env = vec![
            (
                "MESHBRIDGE_ADMIN__LISTEN".to_string(),
                "127.0.0.1:9000".to_string(),
            ),
            ("MESHBRIDGE_LEASE_TTL_SECS".to_string(), "7".to_string()),
            ("MESHBRIDGE_LOG".to_string(), "debug".to_string()),
        ];
        let cfg = parse_with_env::<Sample>("t", text, &env).unwrap();
        assert_eq!(cfg.admin.listen, "127.0.0.1:9000");
        assert_eq!(cfg.lease_ttl_secs, 7);
    }

    /// A top-level field the file leaves out is set from the environment too; variables
    /// that name no field (another tool's, or the tests') are left alone.
    #[test]
    fn env_sets_top_level_fields_the_file_leaves_out() {
        let text = "site = \"east\"\nlease_ttl_secs = 5\n[admin]\nlisten = \"127.0.0.1:1\"\n";
        let env = [
            ("MESHBRIDGE_WORKERS", "4"),
            ("MESHBRIDGE_ENVOY", "/opt/envoy"),
            ("MESHBRIDGE_EXIT_WITH_PARENT", "1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = parse_with_env::<Sample>("t", text, &env).unwrap();
        assert_eq!(cfg.workers, 4);
    }

    /// A role whose type refuses unknown fields outright (as the kube adapter's does).
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        site: String,
        #[serde(default)]
        workers: usize,
    }

    impl RoleConfig for Strict {
        fn validate(&self, _: &mut Problems) {}
    }

    /// Another tool's variable is not an unknown field there either (the tests' own
    /// `MESHBRIDGE_ENVOY` stopped the kube adapter at start).
    #[test]
    fn other_tools_variables_do_not_trip_a_strict_role() {
        let env = [
            ("MESHBRIDGE_ENVOY", "/opt/envoy"),
            ("MESHBRIDGE_WORKERS", "3"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = parse_with_env::<Strict>("t", "site = \"east\"\n", &env).unwrap();
        assert_eq!(cfg.workers, 3);
    }

    /// The command line's own variables (`ctl`'s `MESHBRIDGE_REGISTRY`, `--config`'s
    /// `MESHBRIDGE_CONFIG`, the log's) are not config overrides: `MESHBRIDGE_REGISTRY`
    /// exported for `ctl` broke the agent's `registry` list.
    #[test]
    fn the_command_lines_variables_are_not_overrides() {
        let text = "site = \"east\"\nlease_ttl_secs = 5\nregistry = [\"https://a:1\"]\n\
                    [admin]\nlisten = \"127.0.0.1:1\"\n";
        let env = [
            ("MESHBRIDGE_REGISTRY", "https://127.0.0.1:7443"),
            ("MESHBRIDGE_CONFIG", "other.toml"),
            ("MESHBRIDGE_LOG", "debug"),
            ("MESHBRIDGE_LOG_FORMAT", "json"),
            ("MESHBRIDGE_TLS_DIR", "ctl"),
            ("MESHBRIDGE_MALLOC_TUNING", "off"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = parse_with_env::<Sample>("t", text, &env).unwrap();
        assert_eq!(cfg.registry, ["https://a:1"]);
    }

    /// A bad value from the environment is not blamed on the file alone.
    #[test]
    fn a_bad_value_from_the_environment_names_its_variable() {
        let text = "site = \"east\"\nlease_ttl_secs = 5\n[admin]\nlisten = \"127.0.0.1:1\"\n";
        let env = [
            ("MESHBRIDGE_ADMIN__LISTEN", "bogus"),
            ("MESHBRIDGE_LEASE_TTL_SECS", "\"soon\""),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let err = parse_with_env::<Sample>("t.toml", text, &env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("set by MESHBRIDGE_LEASE_TTL_SECS"), "{text}");
        let env =
            [("MESHBRIDGE_ADMIN__LISTEN", "bogus")].map(|(k, v)| (k.to_string(), v.to_string()));
        let text = parse_with_env::<Sample>(
            "t.toml",
            "site = \"east\"\nlease_ttl_secs = 5\n[admin]\nlisten = \"127.0.0.1:1\"\n",
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("admin.listen") && text.contains("set by MESHBRIDGE_ADMIN__LISTEN"),
            "{text}"
        );
    }

    #[test]
    fn syntax_errors_name_the_source() {
        let err = parse_with_env::<Sample>("x.toml", "site = ", &[]).unwrap_err();
        assert_eq!(err.problems[0].field, "(syntax)");
        assert!(err.to_string().starts_with("x.toml: 1 problem"));
    }
}
