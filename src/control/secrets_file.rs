//! The secrets file as `subscriptions sync` and `rotate` keep it: the relay's `id=secret`
//! format, one a line, each entry after a `#@` line of metadata the relay skips as a comment.
//!
//! ```text
//! #@ event=invitation.created fp=1a2b3c4d
//! 5e0c…=Q3x…
//! #@ event=connection.staled fp=9f8e7d6c retire_after=2026-12-01T13:00:00Z
//! 77aa…=old…
//! #@ event=share_agreement.created fp=0badf00d pending
//! *=Zk2…
//! ```
//!
//! A `pending` entry is keyed `*` (any webhook id): it is written and loaded by every relay
//! before the create that makes Catena sign with it, so the new subscription's first delivery
//! already verifies, whatever id Catena gives it; the entry is re-keyed to that id afterwards.
//! The metadata holds no commas: the relay also splits on them.

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// One secret line and what we know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The webhook id, or `*` while pending.
    pub id: String,
    pub secret: String,
    pub event_name: String,
    /// When set, the secret may be removed after this time (the rotation overlap).
    pub retire_after: Option<DateTime<Utc>>,
}

impl Entry {
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.secret)
    }

    pub fn is_pending(&self) -> bool {
        self.id == "*"
    }
}

/// The first 8 hex digits of SHA-256 of a secret: enough to tell secrets apart in the registry
/// and the logs, useless for forging.
pub fn fingerprint(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new webhook secret: 32 alphanumerics from the OS RNG (Catena's minimum is 12).
pub fn generate_secret() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {0}: an entry is not of the form webhook_id=secret")]
    Malformed(usize),
}

/// The whole file. Lines we did not write (hand-added `id=secret` pairs, other comments) are
/// kept as they are, so sync never removes a secret it does not own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretsFile {
    pub entries: Vec<Entry>,
    foreign: Vec<String>,
}

/// No commas in here either.
const HEADER: &str = "# catena-ingest webhook secrets: written by `catena-ingest subscriptions sync` and `rotate` and read by the relay. Do not edit the #@ lines.";

impl SecretsFile {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut file = Self::default();
        let mut meta: Option<(String, Option<DateTime<Utc>>)> = None;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("#@") {
                meta = Some(parse_meta(rest));
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                if line != HEADER && !line.is_empty() {
                    file.foreign.push(line.to_owned());
                }
                continue;
            }
            let (id, secret) = line
                .split_once('=')
                .ok_or(ParseError::Malformed(number + 1))?;
            match meta.take() {
                Some((event_name, retire_after)) => file.entries.push(Entry {
                    id: id.trim().to_owned(),
                    secret: secret.trim().to_owned(),
                    event_name,
                    retire_after,
                }),
                None => file.foreign.push(line.to_owned()),
            }
        }
        Ok(file)
    }

    pub fn render(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for line in &self.foreign {
            out.push_str(line);
            out.push('\n');
        }
        for entry in &self.entries {
            out.push_str(&format!(
                "#@ event={} fp={}",
                entry.event_name,
                entry.fingerprint()
            ));
            if let Some(at) = entry.retire_after {
                out.push_str(&format!(
                    " retire_after={}",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
            if entry.is_pending() {
                out.push_str(" pending");
            }
            out.push('\n');
            out.push_str(&format!("{}={}\n", entry.id, entry.secret));
        }
        out
    }

    /// The pending secret for an event name, if a create was prepared and not finished.
    pub fn pending(&self, event_name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.is_pending() && e.event_name == event_name)
    }

    pub fn of_id<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| e.id == id)
    }

    /// The secret with this fingerprint for an id (what Catena signs with, per the registry).
    pub fn secret_of(&self, id: &str, fp: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.id == id && e.fingerprint() == fp)
    }

    pub fn add(&mut self, entry: Entry) {
        if !self.entries.contains(&entry) {
            self.entries.push(entry);
        }
    }

    /// Give a pending entry its webhook id.
    pub fn rekey(&mut self, event_name: &str, secret: &str, id: &str) {
        for entry in &mut self.entries {
            if entry.is_pending() && entry.event_name == event_name && entry.secret == secret {
                entry.id = id.to_owned();
            }
        }
        self.dedup();
    }

    pub fn remove_where(&mut self, mut remove: impl FnMut(&Entry) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| !remove(e));
        before - self.entries.len()
    }

    fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .retain(|e| seen.insert((e.id.clone(), e.secret.clone())));
    }
}

fn parse_meta(text: &str) -> (String, Option<DateTime<Utc>>) {
    let mut event_name = String::new();
    let mut retire_after = None;
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("event", value)) => event_name = value.to_owned(),
            Some(("retire_after", value)) => {
                retire_after = DateTime::parse_from_rfc3339(value)
                    .ok()
                    .map(|t| t.with_timezone(&Utc));
            }
            _ => {}
        }
    }
    (event_name, retire_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::secrets::SecretStore;

    #[test]
    fn round_trips_and_the_relay_reads_it() {
        let mut file = SecretsFile::parse("# mine\nhand-made=secret-by-hand\n").unwrap();
        file.add(Entry {
            id: "*".into(),
            secret: "pendingsecret0001".into(),
            event_name: "invitation.created".into(),
            retire_after: None,
        });
        file.add(Entry {
            id: "wh-1".into(),
            secret: "oldsecret0000001".into(),
            event_name: "connection.staled".into(),
            retire_after: Some("2026-12-01T13:00:00Z".parse().unwrap()),
        });
        let text = file.render();
        assert!(!text.contains(','), "no commas: the relay splits on them");
        assert_eq!(SecretsFile::parse(&text).unwrap(), file);
        let store = SecretStore::parse(&text).unwrap();
        assert_eq!(
            store.len(),
            3,
            "the relay sees every secret, the hand-made one too"
        );
        assert_eq!(
            file.pending("invitation.created").unwrap().secret,
            "pendingsecret0001"
        );

        file.rekey("invitation.created", "pendingsecret0001", "wh-2");
        assert!(file.pending("invitation.created").is_none());
        assert_eq!(file.of_id("wh-2").count(), 1);
        let fp = fingerprint("oldsecret0000001");
        assert_eq!(
            file.secret_of("wh-1", &fp).unwrap().event_name,
            "connection.staled"
        );
        assert!(text.contains("hand-made=secret-by-hand"));
    }

    #[test]
    fn secrets_are_long_and_distinct() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(fingerprint(&a).len(), 8);
    }
}
