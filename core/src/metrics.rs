//! The Prometheus text exposition format (version 0.0.4) for `mesh_status`, and the fixed
//! label sets the counters are kept under.
//!
//! The shell keeps the counters (plain atomics in shared memory) and hands their values to
//! an [`Exposition`], which writes `# HELP` / `# TYPE` lines and samples with escaped label
//! values. Label values are bounded: decisions, verification outcomes and refresh results are
//! the fixed lists below; providers, zones and audiences are names from the configuration;
//! callers (`mesh_requests_total{caller}`) are bounded by `mesh_metrics_callers`.

use std::fmt::Write;

use crate::status::AuthStatus;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// Status classes (`mesh_requests_total{code}`): the class, not the code, so that a
/// caller's series stay few (five per decision) whatever statuses its upstream answers.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The class index of a status; one outside 100..=599 (nginx logs 0 for a request that got
/// no response) counts as `5xx`, a failure of the server to answer.
pub fn code_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 4,
    }
}

/// Upper bounds (milliseconds) of the duration histograms' buckets: from 1 ms (a cached
/// token on loopback) to 30 s (a slow upstream), roughly 1-2.5-5 per decade; `+Inf` follows.
pub const DURATION_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000,
];

/// The bucket a duration falls in (`DURATION_BUCKETS_MS.len()`: `+Inf` only).
pub fn duration_bucket(ms: u64) -> usize {
    DURATION_BUCKETS_MS.partition_point(|&le| le < ms)
}

/// The `le` label of each bucket, then `+Inf`.
pub fn bucket_le(i: usize) -> String {
    match DURATION_BUCKETS_MS.get(i) {
        Some(&ms) => format!("{}", ms as f64 / 1000.0),
        None => "+Inf".into(),
    }
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

    /// One histogram's samples (after its `family`): `buckets` per [`DURATION_BUCKETS_MS`]
    /// bucket and `+Inf` (not cumulative: summed here), and the sum in milliseconds.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], buckets: &[u64], sum_ms: u64) {
        let bucket = format!("{name}_bucket");
        let mut total = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            total += n;
            let le = bucket_le(i);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, total);
        }
        self.sample(&format!("{name}_sum"), labels, sum_ms as f64 / 1000.0);
        self.sample(&format!("{name}_count"), labels, total);
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
    fn durations_fall_in_the_first_bucket_that_holds_them() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(1), 0);
        assert_eq!(duration_bucket(2), 1);
        assert_eq!(duration_bucket(3), 2);
        assert_eq!(duration_bucket(30_000), 13);
        assert_eq!(duration_bucket(30_001), DURATION_BUCKETS_MS.len());
        assert_eq!(bucket_le(0), "0.001");
        assert_eq!(bucket_le(9), "1");
        assert_eq!(bucket_le(14), "+Inf");
        assert_eq!(
            [99, 100, 204, 399, 404, 503, 599, 0, 600].map(code_class),
            [4, 0, 1, 2, 3, 4, 4, 4, 4]
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let mut e = Exposition::new();
        e.family("d_seconds", Kind::Histogram, "h");
        let mut b = [0u64; DURATION_BUCKETS_MS.len() + 1];
        b[0] = 2;
        b[3] = 1;
        b[DURATION_BUCKETS_MS.len()] = 1;
        e.histogram("d_seconds", &[("caller", "a")], &b, 40_012);
        let out = e.finish();
        assert!(out.contains("# TYPE d_seconds histogram\n"), "{out}");
        assert!(
            out.contains("d_seconds_bucket{caller=\"a\",le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{caller=\"a\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{caller=\"a\",le=\"0.01\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{caller=\"a\",le=\"30\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{caller=\"a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_sum{caller=\"a\"} 40.012\n"),
            "{out}"
        );
        assert!(out.contains("d_seconds_count{caller=\"a\"} 4\n"), "{out}");
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
