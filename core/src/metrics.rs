//! The Prometheus text exposition format (version 0.0.4) for `mesh_status`, and the fixed
//! label sets the counters are kept under.
//!
//! The shell keeps the counters (plain atomics in shared memory) and hands their values to
//! an [`Exposition`], which writes `# HELP` / `# TYPE` lines and samples with escaped label
//! values. Label values are bounded: decisions, verification outcomes and refresh results are
//! the fixed lists below; providers, zones and audiences are names from the configuration.
//! No caller name is ever a label.

use std::fmt::Write;

use crate::status::AuthStatus;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `$mesh_decision` values, in counter order (`mesh_requests_total{decision}`).
pub const DECISIONS: [&str; 6] = [
    "allow",
    "deny",
    "unauthenticated",
    "rate_limited",
    "would_deny",
    "would_rate_limit",
];

/// `$mesh_auth_status` values counted per provider (`mesh_auth_total{provider,status}`), in
/// counter order. `off` is not among them: nothing is verified, so there is no provider.
pub const AUTH_STATUSES: [AuthStatus; 11] = [
    AuthStatus::Missing,
    AuthStatus::Malformed,
    AuthStatus::BadSignature,
    AuthStatus::UnknownKey,
    AuthStatus::Expired,
    AuthStatus::NotYetValid,
    AuthStatus::WrongIssuer,
    AuthStatus::WrongAudience,
    AuthStatus::ClaimMismatch,
    AuthStatus::NoKeys,
    AuthStatus::Verified,
];

/// The counter index of a verification outcome; `None` for `off`.
pub fn auth_index(s: AuthStatus) -> Option<usize> {
    AUTH_STATUSES.iter().position(|&a| a == s)
}

/// Results of a key refresh (`mesh_keys_refresh_total{provider,result}`).
pub const REFRESH_RESULTS: [&str; 2] = ["success", "failure"];

/// Status classes of `mesh_upstream_requests_total{code}`: the class, not the code, keeps
/// the series few (five per route) whatever the upstream answers.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The counter index of a status's class; `None` outside 100..=599 (no response).
pub fn status_class(status: u64) -> Option<usize> {
    (100..600)
        .contains(&status)
        .then(|| (status / 100 - 1) as usize)
}

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples of the family follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "metric name {name}");
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"));
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample: `name{label="value",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (l, v)) in labels.iter().enumerate() {
                debug_assert!(valid_name(l), "label name {l}");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(l);
                self.out.push_str("=\"");
                escape_label_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        value.write_to(&mut self.out);
        self.out.push('\n');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample value: integers as they are, floats as Go's `strconv` writes them well enough for
/// any Prometheus parser (`NaN`, `+Inf`, `-Inf` spelt as the format wants).
pub trait Value {
    fn write_to(&self, out: &mut String);
}

impl Value for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for i64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

/// A label value as the text format wants it: `\` as `\\`, `"` as `\"`, a line feed as `\n`.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    escape_label_into(&mut s, v);
    s
}

fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `# HELP` text: `\` as `\\`, a line feed as `\n` (quotes stay).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A 64-bit FNV-1a hash of a configured name: how the shell finds a name's counters again in
/// shared memory after a reload, together with its length and first bytes.
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(100), Some(0));
        assert_eq!(status_class(204), Some(1));
        assert_eq!(status_class(499), Some(3));
        assert_eq!(status_class(599), Some(4));
        assert_eq!(status_class(0), None);
        assert_eq!(status_class(600), None);
        assert_eq!(STATUS_CLASSES[status_class(503).unwrap()], "5xx");
    }

    #[test]
    fn families_and_samples() {
        let mut e = Exposition::new();
        e.family("mesh_requests_total", Kind::Counter, "Requests decided.");
        e.sample("mesh_requests_total", &[("decision", "allow")], 3u64);
        e.sample("mesh_requests_total", &[("decision", "deny")], 0u64);
        e.family("mesh_config_info", Kind::Gauge, "The configuration.");
        e.sample("mesh_config_info", &[("version", "v1"), ("x", "y")], 1u64);
        e.family("mesh_token_cache_hits_total", Kind::Counter, "Hits.");
        e.sample("mesh_token_cache_hits_total", &[], 7u64);
        e.sample("g", &[], -5i64);
        assert_eq!(
            e.finish(),
            "# HELP mesh_requests_total Requests decided.\n\
             # TYPE mesh_requests_total counter\n\
             mesh_requests_total{decision=\"allow\"} 3\n\
             mesh_requests_total{decision=\"deny\"} 0\n\
             # HELP mesh_config_info The configuration.\n\
             # TYPE mesh_config_info gauge\n\
             mesh_config_info{version=\"v1\",x=\"y\"} 1\n\
             # HELP mesh_token_cache_hits_total Hits.\n\
             # TYPE mesh_token_cache_hits_total counter\n\
             mesh_token_cache_hits_total 7\n\
             g -5\n"
        );
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
        assert_eq!(escape_label("plain-ünï"), "plain-ünï");
        let mut e = Exposition::new();
        e.sample("m", &[("version", "2026 \"q\"\\\n")], 1u64);
        assert_eq!(e.finish(), "m{version=\"2026 \\\"q\\\"\\\\\\n\"} 1\n");
        assert_eq!(escape_help("a\\b\nc \"d\""), "a\\\\b\\nc \"d\"");
    }

    #[test]
    fn floats() {
        let mut s = String::new();
        f64::NAN.write_to(&mut s);
        s.push(' ');
        f64::INFINITY.write_to(&mut s);
        s.push(' ');
        f64::NEG_INFINITY.write_to(&mut s);
        s.push(' ');
        1.5f64.write_to(&mut s);
        assert_eq!(s, "NaN +Inf -Inf 1.5");
    }

    #[test]
    fn label_sets() {
        assert_eq!(auth_index(AuthStatus::Off), None);
        assert_eq!(auth_index(AuthStatus::Missing), Some(0));
        assert_eq!(auth_index(AuthStatus::Verified), Some(10));
        // Every status but `off`, each once.
        for (i, s) in AUTH_STATUSES.iter().enumerate() {
            assert_eq!(auth_index(*s), Some(i));
            assert_ne!(*s, AuthStatus::Off);
        }
        assert!(valid_name("mesh_keys_last_refresh_timestamp_seconds"));
        assert!(!valid_name("9x") && !valid_name("a-b") && !valid_name(""));
        assert_ne!(name_hash("google"), name_hash("googlf"));
        assert_eq!(name_hash(""), 0xcbf2_9ce4_8422_2325);
    }
}
