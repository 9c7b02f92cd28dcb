//! A production `switchboard node` on an empty data folder: no demo data, one admin
//! created on first start, whose password survives restarts and `kill -9`.

use serde_json::json;
use switchboard_chaos_tests::Dev;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_one_admin_who_can_configure_the_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut node = Dev::start_node(&data).await?;
    let password_file = data.join("admin-password");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&password_file)?.permissions().mode() & 0o777, 0o600, "only the owner reads the password");
    }
    let admin = node.login("admin").await?;
    let (status, users) = node.api("GET", "/api/users", Some(&admin), None).await?;
    assert_eq!(status, 200);
    assert_eq!(users["users"].as_array().map(Vec::len), Some(1), "no demo users on a production node: {users}");
    let (status, groups) = node.api("GET", "/api/skill-groups", Some(&admin), None).await?;
    assert_eq!(status, 200);
    assert_eq!(groups["skill_groups"].as_array().map(Vec::len), Some(0), "{groups}");
    let (status, reply) = node.api("PUT", "/api/skill-groups/support", Some(&admin), Some(json!({"name": "Support"}))).await?;
    assert_eq!(status, 200, "{reply}");
    // No panic button on a production node unless it was started with one.
    let (status, reply) = node.api("POST", "/api/chaos/crash-actor", Some(&admin), Some(json!({"stream": "group", "id": "support"}))).await?;
    assert_eq!(status, 404, "{reply}");
    assert!(reply["message"].as_str().unwrap_or_default().contains("--enable-chaos-drills"), "{reply}");

    // After kill -9 and a restart the same password works and no second admin appears.
    node.kill9().await?;
    let password = std::fs::read_to_string(&password_file)?;
    drop(node);
    let node = Dev::start_node(&data).await?;
    assert_eq!(std::fs::read_to_string(&password_file)?, password);
    let admin = node.login("admin").await?;
    let (_, users) = node.api("GET", "/api/users", Some(&admin), None).await?;
    assert_eq!(users["users"].as_array().map(Vec::len), Some(1), "{users}");
    Ok(())
}
