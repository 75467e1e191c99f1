//! `[ui]`: the operator station, web pages served under `/ui` by the HTTP server (`http.listen`).
//! Reading follows `http.protect_reads`; every action needs an operator's login. Operators are listed
//! here with an argon2 hash of their password (`anomalyd passwd` makes one), never the password.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Serve the pages (on by default; nobody can act on them until an operator is configured).
    pub enabled: bool,
    /// How long a login lasts without use, in minutes.
    pub session_minutes: u64,
    /// The durable audit log of operator actions (JSON lines, each written with fsync); default
    /// `<state dir>/audit.jsonl`.
    pub audit: Option<PathBuf>,
    /// Who may log in.
    pub operator: Vec<Operator>,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self { enabled: true, session_minutes: 480, audit: None, operator: Vec::new() }
    }
}

/// `[[ui.operator]]`: a login name and the PHC string of its argon2 password hash.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Operator {
    pub name: String,
    pub password_hash: String,
}

impl UiConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=10_080).contains(&self.session_minutes) {
            p.push(format!("ui.session_minutes = {}: use 1 to 10080 (a week)", self.session_minutes));
        }
        if self.audit.as_ref().is_some_and(|a| a.as_os_str().is_empty()) {
            p.push("ui.audit = \"\": operator actions must be kept; name a file or leave it out".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, o) in self.operator.iter().enumerate() {
            if !crate::config::daemon::valid_name(&o.name) {
                p.push(format!("ui.operator[{i}].name = {:?}: use 1-64 letters, digits, '-' or '_'", o.name));
            } else if !seen.insert(o.name.as_str()) {
                p.push(format!("ui.operator[{i}].name = {:?} is listed twice", o.name));
            }
            match argon2::PasswordHash::new(&o.password_hash) {
                Ok(h) if h.algorithm.as_str().starts_with("argon2") => {}
                _ => p.push(format!(
                    "ui.operator[{i}].password_hash (operator {:?}) is not an argon2 hash: make one with \
                     `anomalyd passwd` (it reads the password from standard input)",
                    o.name
                )),
            }
        }
        p
    }
}
