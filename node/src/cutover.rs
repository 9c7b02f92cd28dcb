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
#[derive(Default)]
pub(crate) struct CutOver {
    /// A cut-over a crash interrupted between its two renames was finished instead.
    pub finished_interrupted: bool,
    /// Conversation shards the folder has now.
    pub shards: u64,
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
    let kept = sibling(data, "one-group")?;
    let new = sibling(data, "split-new")?;
    if !holds_node(data) && kept.exists() && new.join("layout").exists() {
        // A crash came between the two renames: the old folder is aside, the new one
        // whole (its layout file is written last): the second rename finishes it. What
        // was made in its place since (a log file) goes into it.
        if data.exists() {
            for entry in std::fs::read_dir(data).with_context(|| format!("read {}", data.display()))? {
                let entry = entry?;
                let to = new.join(entry.file_name());
                anyhow::ensure!(!to.exists(), "{} and {} both exist: move one away, then split again", entry.path().display(), to.display());
                std::fs::rename(entry.path(), &to)?;
            }
            std::fs::remove_dir(data).with_context(|| format!("remove {}", data.display()))?;
        }
        let layout = std::fs::read_to_string(new.join("layout")).unwrap_or_default();
        std::fs::rename(&new, data).with_context(|| format!("rename {} to {}", new.display(), data.display()))?;
        sync_parent(data)?;
        let made: u64 = layout.trim().strip_prefix("split shards=").and_then(|n| n.parse().ok()).unwrap_or(shards);
        return Ok(CutOver { finished_interrupted: true, kept, shards: made, ..CutOver::default() });
    }
    if let Ok(layout) = std::fs::read_to_string(data.join("layout")) {
        anyhow::bail!("{} is split already ({}): there is nothing to do", data.display(), layout.trim());
    }
    anyhow::ensure!(
        !data.join("sled").join("db").exists() && !data.join("sled").join("conf").exists(),
        "{} is kept in sled by an older build: start the node once with this build (it moves the folder out of sled), stop it, and split again",
        data.display()
    );
    anyhow::ensure!(data.join("records").exists(), "{} holds no node's records: there is nothing to split", data.display());
    anyhow::ensure!(!kept.exists(), "{} exists: a folder split before is kept there; move it away first", kept.display());
    // The new folder is made beside the old one and renamed into its place: both must
    // be on one file system, so the data folder cannot be a mount point of its own.
    let parent = data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    {
        use std::os::unix::fs::MetadataExt;
        anyhow::ensure!(
            !std::fs::symlink_metadata(data)?.file_type().is_symlink(),
            "{} is a link: give the folder it names, which the split folder is made beside",
            data.display()
        );
        let (here, above) = (std::fs::metadata(data)?, std::fs::metadata(parent)?);
        anyhow::ensure!(
            here.dev() == above.dev(),
            "{} is a mount point: the split folder is made beside it and renamed into its place, which cannot cross file systems. Mount the volume one level up (the data folder a folder in it), or copy the folder onto the volume that holds its parent, then split",
            data.display()
        );
    }
    let lock_path = data.join("switchboard.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("a switchboard is using the data folder {}: stop it first", data.display());
    }
    crate::split::check_layout(data, None)?;

    if new.exists() {
        // A cut-over that did not finish (no layout file yet): the old folder is as it
        // was (its record store opened as a start opens it), start again.
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
    // Attachment files the records name that this node does not have (a file needs
    // copies on a majority only): the other members' folders may hold the only ones.
    let (mut missing, mut first_missing) = (0u64, None);
    let files = data.join("attachments");
    let point = switchboard_raft::store::export_group(&old, 1, &data.join("log").join("g1"), |chunk| {
        for (key, value) in chunk {
            read += 1;
            if let Some(id) = key.strip_prefix(b"A").and_then(|id| std::str::from_utf8(id).ok()) {
                if !files.join(id).exists() {
                    missing += 1;
                    first_missing.get_or_insert_with(|| id.to_owned());
                }
            }
            for (part, key, value) in splitter.route(&key, &value).map_err(|e| e.to_string())? {
                let seed = seeds.get_mut(&group_of(part)).ok_or_else(|| format!("no group for {part:?}"))?;
                seed.put(&key, &value).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })?;
    drop(old);
    if let Some(first) = first_missing {
        let _ = std::fs::remove_dir_all(&new);
        anyhow::bail!(
            "{missing} attachment files the records name are not in {} (the first: {first}); another member holds them. Start the old cluster so that this node fetches them (it looks every 10 s), stop it, and split again; or split another member's folder",
            files.display()
        );
    }

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
        if matches!(name.to_str(), Some("records" | "records.ready" | "records.creating" | "log" | "snapshots" | "switchboard.lock")) {
            continue;
        }
        link_tree(&entry.path(), &new.join(&name))?;
    }
    // The new folder belongs to whoever owns the old one (the service's user, when the
    // split is run as root). Its layout file comes last: a folder with one is whole.
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(data)?;
        chown_tree(&new, owner.uid(), owner.gid())?;
        std::fs::set_permissions(&new, owner.permissions())?;
        sync_tree_dirs(&new)?;
        let layout = new.join("layout");
        switchboard_raft::files::write_private(&layout, format!("split shards={shards}\n").as_bytes())?;
        std::os::unix::fs::lchown(&layout, Some(owner.uid()), Some(owner.gid()))?;
        sync_tree_dirs(&new)?;
    }

    // The swap: the old folder aside, the new one in its place, each rename durable.
    // The lock is held throughout (it follows its folder): no node starts on the old
    // folder meanwhile.
    std::fs::rename(data, &kept).with_context(|| format!("rename {} to {}", data.display(), kept.display()))?;
    sync_parent(data)?;
    std::fs::rename(&new, data).with_context(|| format!("rename {} to {}", new.display(), data.display()))?;
    sync_parent(data)?;
    drop(lock);
    Ok(CutOver { records, read, at: point.applied.index, kept, finished_interrupted: false, shards })
}

/// Syncs the folder that holds `path`.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", parent.display()))
}

/// Refuses to start on `data` while a cut-over of it is unfinished: a crash between
/// its renames leaves no folder there, and a start would make an empty one and with it
/// a new, empty cluster.
pub(crate) fn refuse_unfinished(data: &Path) -> anyhow::Result<()> {
    let (kept, new) = (sibling(data, "one-group")?, sibling(data, "split-new")?);
    if new.join("layout").exists() && kept.exists() && !holds_node(data) {
        anyhow::bail!(
            "a cut-over of {} into the split was interrupted ({} is whole, the old folder is {}): run `switchboard cluster split --data {}` again to finish it",
            data.display(),
            new.display(),
            kept.display(),
            data.display()
        );
    }
    Ok(())
}

/// Gives what this run made under `dir` to `uid`:`gid`: folders, links, copies and new
/// files, never a file hard-linked from the old folder (one file: its owner is the
/// kept folder's too, and stays as it was).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_file() && meta.nlink() > 1 {
        return Ok(());
    }
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).with_context(|| format!("give {} to its folder's owner", dir.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Whether `dir` holds a node's state (its records, log or layout file).
fn holds_node(dir: &Path) -> bool {
    ["records", "log", "layout"].iter().any(|n| dir.join(n).exists())
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
    if kind.file_type().is_symlink() {
        // A link (certificates or files kept on another volume) stays a link.
        let target = std::fs::read_link(from).with_context(|| format!("read the link {}", from.display()))?;
        std::os::unix::fs::symlink(&target, to).with_context(|| format!("link {} to {}", to.display(), target.display()))?;
    } else if kind.is_dir() {
        std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
        std::fs::set_permissions(to, kind.permissions()).with_context(|| format!("set the mode of {}", to.display()))?;
        for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if kind.is_file() {
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
            std::fs::File::open(to).and_then(|f| f.sync_all())?;
        }
    } else {
        anyhow::bail!("{} is neither a file, a folder nor a link: move it out of the data folder, then split", from.display());
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
