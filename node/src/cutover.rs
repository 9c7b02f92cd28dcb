//! `switchboard cluster split`: the cut-over of a stopped node's data folder of one
//! Raft group into ADR 0006's split (the metadata group, the routing shard and N
//! conversation shards), offline.
//!
//! The folder's group 1 must have applied its whole log (a node stopped as usual has).
//! Its records are read once, in key order, and each goes to the groups that hold it
//! in a split cluster (`switchboard_actors::cutover::Splitter`); every new group
//! starts as of the old group's last applied entry, with this node its only voter and
//! no log behind that point, as a replica that installed a snapshot does. The new
//! folder is made beside the old one, synced, and only then swapped in: the old folder
//! stays, renamed `<folder>.one-group`, until the operator removes it. Other members of
//! the old cluster do not carry over: their folders are removed and they join the new
//! cluster (`join = true`), which sends each a snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use switchboard_actors::mail::GroupId;
use switchboard_actors::cutover::{SplitPart, Splitter};

use crate::groups::{FIRST_C, G0, R};

/// What a cut-over did.
pub(crate) struct CutOver {
    /// Records written per group.
    pub records: BTreeMap<GroupId, u64>,
    /// Records of the old group read.
    pub read: u64,
    /// The last entry the old group had applied: every new group starts there.
    pub at: u64,
    /// Where the old folder is kept.
    pub kept: PathBuf,
}

/// The group of a part of the split with `shards` conversation shards.
fn group_of(part: SplitPart) -> GroupId {
    match part {
        SplitPart::Directory => G0,
        SplitPart::Routing => R,
        SplitPart::Conversations(k) => FIRST_C + k,
    }
}

/// Moves the data folder `data` of a stopped node `node_id` of one group into the split
/// with `shards` conversation shards (see the module's documentation).
pub(crate) fn split_folder(data: &Path, node_id: u64, shards: u64) -> anyhow::Result<CutOver> {
    anyhow::ensure!((1..=64).contains(&shards), "a split node has 1 to 64 conversation shards, not {shards}");
    anyhow::ensure!(data.join("records").exists(), "{} holds no node's records: there is nothing to split", data.display());
    let kept = sibling(data, "one-group")?;
    anyhow::ensure!(!kept.exists(), "{} exists: a folder split before is kept there; move it away first", kept.display());
    let lock_path = data.join("switchboard.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("a switchboard is using the data folder {}: stop it first", data.display());
    }
    crate::split::check_layout(data, None)?;

    let new = sibling(data, "split-new")?;
    if new.exists() {
        // A cut-over that did not finish: the old folder is untouched, start again.
        std::fs::remove_dir_all(&new).with_context(|| format!("remove the unfinished {}", new.display()))?;
    }
    std::fs::create_dir_all(&new).with_context(|| format!("create {}", new.display()))?;

    let old = switchboard_raft::store::open_keyspace(&data.join("records"), &[1]).context("open the record store")?;
    let groups: Vec<GroupId> = (G0..FIRST_C + shards).collect();
    let keyspace = switchboard_raft::store::open_keyspace(&new.join("records"), &groups).context("create the new record store")?;
    let mut seeds: BTreeMap<GroupId, switchboard_raft::store::GroupSeed> = BTreeMap::new();
    for group in &groups {
        seeds.insert(*group, switchboard_raft::store::GroupSeed::new(&keyspace, *group)?);
    }
    let mut read = 0u64;
    let mut splitter = Splitter::new(shards);
    let point = switchboard_raft::store::export_group(&old, 1, &data.join("log").join("g1"), |chunk| {
        for (key, value) in chunk {
            read += 1;
            for (part, key, value) in splitter.route(&key, &value).map_err(|e| e.to_string())? {
                let seed = seeds.get_mut(&group_of(part)).ok_or_else(|| format!("no group for {part:?}"))?;
                seed.put(&key, &value).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })?;
    drop(old);

    // This node alone votes in every new group, at the address it had.
    let membership = point.membership.membership();
    let Some(node) = membership.get_node(&node_id).cloned() else {
        let ids: Vec<String> = membership.nodes().map(|(id, _)| id.to_string()).collect();
        anyhow::bail!("node {node_id} is not a member of the folder's group (its members: {}); give --node-id", ids.join(", "));
    };
    let alone = openraft::Membership::new(vec![std::collections::BTreeSet::from([node_id])], BTreeMap::from([(node_id, node)]));
    let stored = openraft::StoredMembership::new(Some(point.applied), alone);
    let vote = openraft::Vote::new(point.vote.leader_id().term.max(point.applied.leader_id.term), node_id);
    let mut records = BTreeMap::new();
    for (group, seed) in seeds {
        records.insert(group, seed.records());
        seed.finish(point.applied, stored.clone(), vote, &new.join("log").join(format!("g{group}")))?;
    }
    drop(keyspace);

    // What the folder holds besides its groups (certificates, the token key, the demo
    // logins, attachment files) goes along, linked where the file system allows.
    for entry in std::fs::read_dir(data).with_context(|| format!("read {}", data.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_str(), Some("records" | "records.ready" | "log" | "snapshots" | "switchboard.lock")) {
            continue;
        }
        link_tree(&entry.path(), &new.join(&name))?;
    }
    switchboard_raft::files::write_private(&new.join("layout"), format!("split shards={shards}\n").as_bytes())?;
    sync_tree_dirs(&new)?;

    // The swap: the old folder aside, the new one in its place, each rename durable.
    drop(lock);
    let parent = data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::rename(data, &kept).with_context(|| format!("rename {} to {}", data.display(), kept.display()))?;
    std::fs::File::open(parent).and_then(|d| d.sync_all())?;
    std::fs::rename(&new, data).with_context(|| format!("rename {} to {}", new.display(), data.display()))?;
    std::fs::File::open(parent).and_then(|d| d.sync_all())?;
    Ok(CutOver { records, read, at: point.applied.index, kept })
}

/// `<folder>.<suffix>` beside `data`.
fn sibling(data: &Path, suffix: &str) -> anyhow::Result<PathBuf> {
    let name = data.file_name().with_context(|| format!("{} names no folder", data.display()))?;
    let mut name = name.to_os_string();
    name.push(format!(".{suffix}"));
    Ok(data.with_file_name(name))
}

/// Makes `to` hold what `from` holds: folders made, files hard-linked (copied where
/// linking fails, across file systems).
fn link_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let kind = std::fs::symlink_metadata(from).with_context(|| format!("read {}", from.display()))?;
    if kind.is_dir() {
        std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
        for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if kind.is_file() {
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
            std::fs::File::open(to).and_then(|f| f.sync_all())?;
        }
    }
    Ok(())
}

/// Syncs every folder under `dir` (and `dir`): the entries made in them are durable.
fn sync_tree_dirs(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree_dirs(&entry.path())?;
        }
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", dir.display()))?;
    Ok(())
}
