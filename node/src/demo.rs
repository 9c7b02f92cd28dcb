//! The demo configuration `switchboard dev` loads into an empty data folder: three
//! skill groups, three operators, a supervisor and an admin, with fresh passwords.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use switchboard_actors::model::*;
use switchboard_gateway::auth::hash_password;
use switchboard_raft::files::write_private;

use crate::bootstrap::password;
use crate::server::RunningNode;

pub const LOGINS_FILE: &str = "demo-logins.json";

const DEMO_USERS: &[(&str, Role, Option<&str>)] = &[
    ("alice", Role::Operator, Some("alice")),
    ("bob", Role::Operator, Some("bob")),
    ("carol", Role::Operator, Some("carol")),
    ("supervisor", Role::Supervisor, None),
    ("admin", Role::Admin, None),
];

fn group(id: &str, name: &str, policy: Policy) -> Command {
    Command::UpsertSkillGroup(SkillGroupConfig { id: SkillGroupId::new(id), name: name.into(), policy, offer_timeout_ms: 30_000, sla_ms: 60_000 })
}

fn operator(id: &str, name: &str, capacity: u32, groups: &[&str]) -> Command {
    Command::UpsertOperator(OperatorConfig {
        id: OperatorId::new(id),
        name: name.into(),
        capacity,
        groups: groups.iter().map(|g| SkillGroupId::new(*g)).collect(),
    })
}

/// Loads the demo configuration unless the data folder already has all of it; returns
/// the logins and passwords either way. Loading is a list of upserts, so a start that
/// crashed halfway through is completed by the next one, with the same passwords.
/// Users cannot be deleted and the admin is upserted last, so a missing demo user means
/// an interrupted first load, never a folder an admin has since configured.
pub async fn ensure(node: &RunningNode, data_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = data_dir.join(LOGINS_FILE);
    let saved: Option<BTreeMap<String, String>> = match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| format!("read {}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let (has_users, complete) = {
        let directory = node.directory();
        let state = directory.read();
        let complete = |logins: &BTreeMap<String, String>| {
            DEMO_USERS.iter().all(|(login, ..)| state.users.contains_key(*login) && logins.contains_key(*login))
        };
        (!state.users.is_empty(), saved.as_ref().is_some_and(complete))
    };
    match &saved {
        Some(logins) if complete => return Ok(logins.clone()),
        None if has_users => anyhow::bail!(
            "{} has users but no {LOGINS_FILE}: it is not a demo data folder (run `switchboard node` on it, or give `dev` another --data-dir)",
            data_dir.display()
        ),
        _ => {}
    }
    let mut commands = vec![
        group("general", "General questions", Policy::LongestIdle),
        group("billing", "Billing", Policy::LeastOccupied),
        group("tech", "Technical support", Policy::LongestIdle),
        operator("alice", "Alice", 2, &["general", "billing"]),
        operator("bob", "Bob", 2, &["general", "tech"]),
        operator("carol", "Carol", 3, &["billing", "tech"]),
        Command::UpsertChannel(ChannelConfig {
            id: ChannelId::new("web"),
            kind: "web".into(),
            name: "Web chat".into(),
            default_group: SkillGroupId::new("general"),
        }),
    ];
    let templates = [
        ("greeting", "Greeting", "general", "Hello {{client.name}}, my name is {{operator.name}}. How can I help you?"),
        ("goodbye", "Goodbye", "general", "Thank you for contacting us, {{client.name}}. Have a nice day!"),
        ("refund", "Refund timeline", "billing", "Refunds reach your account within 5 business days."),
        ("restart", "Restart the router", "tech", "Please unplug the router for 30 seconds, then plug it back in."),
    ];
    for (id, title, group, text) in templates {
        commands.push(Command::UpsertTemplate(Template {
            id: id.into(),
            title: title.into(),
            text: text.into(),
            group: Some(SkillGroupId::new(group)),
            owner: None,
        }));
    }
    let mut logins = BTreeMap::new();
    for &(login, role, operator) in DEMO_USERS {
        let password = match saved.as_ref().and_then(|s| s.get(login)) {
            Some(known) => known.clone(),
            None => password()?,
        };
        let password_hash = hash_password(&password)?;
        commands.push(Command::UpsertUser(UserRecord {
            login: login.into(),
            password_hash,
            role,
            operator: operator.map(OperatorId::new),
        }));
        logins.insert(login.to_string(), password);
    }
    // The logins file is written before the commands commit, so a crash in between
    // never leaves users whose passwords nobody knows.
    write_private(&path, &serde_json::to_vec_pretty(&logins)?)?;
    for command in commands {
        node.submit(command).await.map_err(|e| anyhow::anyhow!("load demo configuration: {e}"))?;
    }
    Ok(logins)
}
