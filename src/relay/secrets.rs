//! Webhook secrets, selected by `X-Webhook-ID`.
//!
//! Catena has one secret per subscription and no overlap window on rotation, so an id may carry
//! two secrets while the old one is retired; `*` is the fallback for ids without an entry. Secrets are kept as
//! bytes behind a type whose `Debug` never prints them.

use std::collections::HashMap;
use std::fmt;

#[derive(Clone, Default)]
pub struct SecretStore {
    by_id: HashMap<String, Vec<Secret>>,
    wildcard: Vec<Secret>,
}

/// A secret's raw UTF-8 bytes (the HMAC key). Never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("ids", &self.by_id.keys().collect::<Vec<_>>())
            .field("wildcard", &!self.wildcard.is_empty())
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretsError {
    #[error("secret entry {0} is not of the form webhook_id=secret")]
    Malformed(usize),
    #[error("secret entry {0} has an empty webhook id or secret")]
    Empty(usize),
}

impl SecretStore {
    /// Parse `id=secret` pairs separated by commas and/or newlines. Blank lines and lines
    /// starting with `#` are skipped (the `_FILE` form). Only the first `=` splits, so secrets
    /// may contain `=`; surrounding whitespace is trimmed.
    pub fn parse(text: &str) -> Result<Self, SecretsError> {
        let mut store = Self::default();
        store.extend_from(text)?;
        Ok(store)
    }

    pub fn extend_from(&mut self, text: &str) -> Result<(), SecretsError> {
        let entries = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'));
        for (index, entry) in entries.enumerate() {
            let (id, secret) = entry
                .split_once('=')
                .ok_or(SecretsError::Malformed(index + 1))?;
            let (id, secret) = (id.trim(), secret.trim());
            if id.is_empty() || secret.is_empty() {
                return Err(SecretsError::Empty(index + 1));
            }
            self.insert(id, secret);
        }
        Ok(())
    }

    pub fn insert(&mut self, webhook_id: &str, secret: &str) {
        let secret = Secret(secret.as_bytes().to_vec());
        if webhook_id == "*" {
            self.wildcard.push(secret);
        } else {
            self.by_id
                .entry(webhook_id.to_owned())
                .or_default()
                .push(secret);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty() && self.wildcard.is_empty()
    }

    /// Secret entries (an id with two secrets counts twice).
    pub fn len(&self) -> usize {
        self.wildcard.len() + self.by_id.values().map(Vec::len).sum::<usize>()
    }

    /// The candidate secrets for a webhook id: its own when it has any, else the catch-all
    /// ones. `*` never widens an id that has secrets of its own (a leaked catch-all must not
    /// forge deliveries for it), and an empty id matches nothing.
    pub fn candidates<'a>(&'a self, webhook_id: &str) -> impl Iterator<Item = &'a Secret> + 'a {
        let own = self.by_id.get(webhook_id);
        let fallback = (own.is_none() && !webhook_id.is_empty()).then_some(&self.wildcard);
        own.into_iter().chain(fallback).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_rotation_and_wildcard() {
        let store = SecretStore::parse("a=one, a=two\n# comment\n*=any=thing\nb = three ").unwrap();
        let a: Vec<_> = store
            .candidates("a")
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(
            a,
            vec![b"one".to_vec(), b"two".to_vec()],
            "no catch-all for a"
        );
        let b: Vec<_> = store
            .candidates("b")
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(b, vec![b"three".to_vec()]);
        let other: Vec<_> = store
            .candidates("zzz")
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(
            other,
            vec![b"any=thing".to_vec()],
            "ids without an entry fall back"
        );
        assert_eq!(store.candidates("").count(), 0, "no id, no secret");
    }

    #[test]
    fn rejects_malformed_and_never_prints_secrets() {
        assert_eq!(
            SecretStore::parse("noequals").err(),
            Some(SecretsError::Malformed(1))
        );
        assert_eq!(
            SecretStore::parse("a=x,=y").err(),
            Some(SecretsError::Empty(2))
        );
        let store = SecretStore::parse("a=topsecretvalue").unwrap();
        assert!(!format!("{store:?}").contains("topsecretvalue"));
        assert!(!format!("{:?}", store.candidates("a").next().unwrap()).contains("topsecretvalue"));
    }
}
