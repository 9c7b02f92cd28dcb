//! First start of a production node: an empty store has no users, so nobody could log
//! in to configure it. The node creates one admin with a random password, written to a
//! file only root (or the service user) can read, and prints where it is.

use std::path::{Path, PathBuf};

use base64::Engine;
use switchboard_actors::model::{Command, Role, UserRecord};
use switchboard_gateway::auth::hash_password;
use switchboard_raft::files::write_private;

use crate::server::RunningNode;

pub const ADMIN_PASSWORD_FILE: &str = "admin-password";

/// A random password of 16 URL-safe characters.
pub fn password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Creates the first admin if the store has no users. Returns the password file when it
/// did. A file left by an earlier start whose commit did not happen is reused, so the
/// password on disk is always the one that works.
pub async fn ensure_admin(node: &RunningNode, data_dir: &Path, login: &str) -> anyhow::Result<Option<PathBuf>> {
    if !node.directory().read().users.is_empty() {
        return Ok(None);
    }
    let path = data_dir.join(ADMIN_PASSWORD_FILE);
    let password = match std::fs::read_to_string(&path) {
        Ok(existing) if !existing.trim().is_empty() => existing.trim().to_owned(),
        _ => {
            let fresh = password()?;
            write_private(&path, format!("{fresh}\n").as_bytes())?;
            fresh
        }
    };
    let password_hash = hash_password(&password)?;
    let user = UserRecord { login: login.to_owned(), password_hash, role: Role::Admin, operator: None };
    node.submit(Command::UpsertUser(user)).await.map_err(|e| anyhow::anyhow!("create the first admin: {e}"))?;
    Ok(Some(path))
}
