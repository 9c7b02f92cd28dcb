//! The demo configuration `switchboard dev` loads into an empty data folder: three
//! skill groups, three operators, a supervisor and an admin, with fresh passwords.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use switchboard_actors::model::*;
use switchboard_gateway::auth::hash_password;

use crate::server::RunningNode;

pub const LOGINS_FILE: &str = "demo-logins.json";

fn password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

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

/// Loads the demo configuration unless the data folder already has one; returns the
/// logins and passwords either way.
pub async fn ensure(node: &RunningNode, data_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = data_dir.join(LOGINS_FILE);
    let configured = !node.shard.read().groups.is_empty();
    if configured {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "{}".into());
        return serde_json::from_str(&text).context("read demo logins");
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
    let users = [
        ("alice", Role::Operator, Some("alice")),
        ("bob", Role::Operator, Some("bob")),
        ("carol", Role::Operator, Some("carol")),
        ("supervisor", Role::Supervisor, None),
        ("admin", Role::Admin, None),
    ];
    for (login, role, operator) in users {
        let password = password()?;
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
    std::fs::write(&path, serde_json::to_vec_pretty(&logins)?)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    for command in commands {
        node.submit(command).await.map_err(|e| anyhow::anyhow!("load demo configuration: {e}"))?;
    }
    Ok(logins)
}
