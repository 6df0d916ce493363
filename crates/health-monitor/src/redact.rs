//! Keeps passwords out of reports: error texts pass through here first.

use pgstack_config::{DatabaseConfig, REDACTED};

/// Removes the configured passwords, and the password part of any URL, from
/// texts that go into reports, alerts and logs.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    pub(crate) fn from_config(config: &DatabaseConfig) -> Self {
        let mut secrets: Vec<String> = std::iter::once(&config.primary)
            .chain(config.replicas.iter())
            .filter_map(|node| node.password.as_ref())
            .map(|p| p.expose().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        // Longest first, so a password containing another is removed whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = redact_url_passwords(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

/// `scheme://user:password@host` → `scheme://user:********@host`.
fn redact_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn removes_configured_passwords_and_url_passwords() {
        let mut config =
            DatabaseConfig::for_tests("postgres://app:hunter22@db.internal/app").unwrap();
        config.replicas.push(
            pgstack_config::NodeSettings::from_url("postgres://ro:other-secret@replica/app")
                .unwrap(),
        );
        let redactor = Redactor::from_config(&config);
        let text = "login failed for hunter22; see postgres://x:plain@h:5432/db and other-secret";
        let out = redactor.redact(text);
        assert!(!out.contains("hunter22"), "{out}");
        assert!(!out.contains("other-secret"), "{out}");
        assert!(!out.contains("plain"), "{out}");
        assert!(out.contains("postgres://x:********@h:5432/db"), "{out}");
    }

    #[test]
    fn leaves_urls_without_passwords_alone() {
        let redactor = Redactor::default();
        let text = "node primary (postgres://app@db:5432/app) and http://example.com/a@b";
        assert_eq!(redactor.redact(text), text);
    }
}
