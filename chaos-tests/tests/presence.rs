//! Presence follows the person, against the real binary with a 2-second grace period:
//! an operator whose last desk closes is set away with the reason `disconnected` and
//! the conversation offered to them goes to someone else at once; a reload within the
//! grace period goes unnoticed; the reason shows on the floor and on the desk's `hello`.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_chaos_tests::{eventually, next_event, set_presence, Dev, WAIT};

async fn dev() -> anyhow::Result<(tempfile::TempDir, Dev)> {
    let dir = tempfile::tempdir()?;
    let dev = Dev::start_with(switchboard_chaos_tests::binary()?, &dir.path().join("data"), &["--presence-grace-s", "2"]).await?;
    Ok((dir, dev))
}

async fn operator(dev: &Dev, id: &str) -> anyhow::Result<Value> {
    let admin = dev.login("admin").await?;
    let (_, list) = dev.api("GET", "/api/operators", Some(&admin), None).await?;
    list["operators"].as_array().and_then(|l| l.iter().find(|o| o["id"] == id).cloned()).ok_or_else(|| anyhow::anyhow!("no operator {id}: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_whose_desk_is_gone_is_set_away_and_their_offer_moves_on() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    let (_ann, conversation, _) = dev.client("Ann").await?;
    let offer = next_event(&mut alice, "offer").await?;
    assert_eq!(offer["conversation"], conversation);

    // Alice's tab closes with the offer pending; Bob is at his desk.
    alice.close().await;
    let closed_at = std::time::Instant::now();
    let (mut bob, _) = dev.operator("bob").await?;
    set_presence(&mut bob, "online").await?;
    let moved = bob.wait_for(Duration::from_secs(15), |v| v["type"] == "event" && v["kind"] == "offer" && v["conversation"] == conversation).await?;
    println!("offer moved to bob {:?} after alice's desk closed (grace 2 s)", closed_at.elapsed());
    assert!(moved["offer"] != offer["offer"]);
    let alice_now = operator(&dev, "alice").await?;
    assert_eq!((alice_now["presence"].clone(), alice_now["presence_reason"].clone()), (json!("away"), json!("disconnected")), "{alice_now}");

    // Her next desk hears why; setting a presence herself clears it.
    let (mut again, hello) = dev.operator("alice").await?;
    assert_eq!((hello["presence"].clone(), hello["presence_reason"].clone()), (json!("away"), json!("disconnected")), "{hello}");
    set_presence(&mut again, "online").await?;
    assert_eq!(operator(&dev, "alice").await?["presence_reason"], Value::Null);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_within_the_grace_period_goes_unnoticed() -> anyhow::Result<()> {
    let (_dir, dev) = dev().await?;
    let (mut alice, _) = dev.operator("alice").await?;
    set_presence(&mut alice, "online").await?;
    // A reloaded page keeps its token: no new login (and its password hash) in the gap.
    let token = dev.login("alice").await?;
    for _ in 0..3 {
        // A page reload: the old socket closes, a new one opens half a second later.
        alice.close().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        alice = switchboard_gateway::client::WsClient::connect(&dev.private, &format!("/ws/operator?token={token}"), None).await?;
        alice.wait_for(WAIT, |v| v["type"] == "hello").await?;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = operator(&dev, "alice").await?;
    assert_eq!((now["presence"].clone(), now["presence_reason"].clone()), (json!("online"), Value::Null), "{now}");
    // And the supervisor's floor says nothing unusual about her.
    let supervisor = dev.login("supervisor").await?;
    let mut floor = switchboard_gateway::client::WsClient::connect(&dev.private, &format!("/ws/supervisor?token={supervisor}"), None).await?;
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor").await?;
    let row = frame["operators"].as_array().and_then(|o| o.iter().find(|o| o["id"] == "alice").cloned()).unwrap_or_default();
    assert_eq!(row["presence"], "online");
    // Now she really leaves: the floor shows why she is away.
    alice.close().await;
    let seen = eventually(Duration::from_secs(15), Duration::from_millis(200), || async {
        let row = operator(&dev, "alice").await?;
        Ok((row["presence_reason"] == "disconnected").then_some(row))
    })
    .await?;
    assert_eq!(seen["presence"], "away");
    let frame = floor.wait_for(WAIT, |v| v["type"] == "floor" && v["operators"].as_array().is_some_and(|o| o.iter().any(|o| o["id"] == "alice" && o["presence_reason"] == "disconnected"))).await?;
    assert!(frame["operators"].is_array());
    Ok(())
}
