//! Logging via `tracing`: plain or JSON, filtered by `MESHBRIDGE_LOG` (or `RUST_LOG`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" | "text" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: use plain or json")),
        }
    }
}

/// Install the global subscriber (once; later calls are ignored). Logs go to stderr.
pub fn init(format: LogFormat, default_filter: &str) -> Option<String> {
    let (filter, warning) = filter(
        std::env::var("MESHBRIDGE_LOG").ok(),
        std::env::var("RUST_LOG").ok(),
        default_filter,
    );
    // Colour only for a person at a terminal: a file, a pipe or a log collector gets plain
    // text (and NO_COLOR turns it off everywhere).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    warning
}

/// The filter from `MESHBRIDGE_LOG` (else `RUST_LOG`), else `default_filter`; and, when the
/// variable's value is not a filter, a warning naming it (to log once logging runs).
fn filter(
    meshbridge_log: Option<String>,
    rust_log: Option<String>,
    default_filter: &str,
) -> (EnvFilter, Option<String>) {
    let (name, value) = match (meshbridge_log, rust_log) {
        (Some(v), _) => ("MESHBRIDGE_LOG", v),
        (None, Some(v)) => ("RUST_LOG", v),
        (None, None) => return (EnvFilter::new(default_filter), None),
    };
    match EnvFilter::try_new(&value) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(default_filter),
            Some(format!(
                "{name}={value:?} is not a log filter ({e}); logging with {default_filter:?}"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bad_filter_is_named_and_the_default_used() {
        let (_, warning) = super::filter(Some("garbage===".into()), None, "info");
        let warning = warning.unwrap_or_default();
        assert!(
            warning.contains("MESHBRIDGE_LOG=\"garbage===\""),
            "{warning}"
        );
        assert!(
            super::filter(Some("debug,h2=warn".into()), None, "info")
                .1
                .is_none()
        );
        assert!(super::filter(None, None, "info").1.is_none());
    }
}
