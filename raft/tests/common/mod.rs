#![allow(dead_code)]
//! A tiny replicated journal used to exercise storage and transport on their own:
//! every entry is kept as a record under its index, so replicas can be compared entry
//! by entry.

use std::sync::Mutex;

use switchboard_raft::{Changes, Machine, Records};

#[derive(Default)]
pub struct Journal {
    pub entries: Mutex<Vec<Vec<u8>>>,
    /// The records, once loaded: to compare replicas record by record.
    pub records: Mutex<Option<Records>>,
}

/// An entry that stands for `count` messages of `size` bytes: each becomes a record of
/// its own (`m` index n), so a few entries make a large state.
pub fn messages(count: u32, size: u32) -> Vec<u8> {
    let mut entry = b"many".to_vec();
    entry.extend_from_slice(&count.to_be_bytes());
    entry.extend_from_slice(&size.to_be_bytes());
    entry
}

impl Journal {
    /// Every record, in key order.
    pub fn all_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let records = self.records.lock().unwrap().clone().expect("loaded");
        let mut out = Vec::new();
        for prefix in [b"e", b"m"] {
            out.extend(records.scan(prefix, None, usize::MAX).expect("scan"));
        }
        out
    }
}

fn key(index: u64) -> Vec<u8> {
    let mut key = b"e".to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

impl Machine for Journal {
    fn apply(&self, index: u64, request: &[u8], changes: &mut Changes) -> Vec<u8> {
        let mut entries = self.entries.lock().unwrap();
        entries.push(request.to_vec());
        changes.put(key(index), request.to_vec());
        if let Some(spec) = request.strip_prefix(b"many") {
            let count = u32::from_be_bytes(spec[0..4].try_into().unwrap());
            let size = u32::from_be_bytes(spec[4..8].try_into().unwrap());
            for n in 0..count {
                let mut k = b"m".to_vec();
                k.extend_from_slice(&index.to_be_bytes());
                k.extend_from_slice(&n.to_be_bytes());
                let text: Vec<u8> = (0..size).map(|i| b'a' + ((index as u32 + n + i) % 26) as u8).collect();
                changes.put(k, text);
            }
        }
        (entries.len() as u64).to_be_bytes().to_vec()
    }

    fn load(&self, records: &Records) -> Result<(), String> {
        let all = records.scan(b"e", None, usize::MAX).map_err(|e| e.to_string())?;
        *self.entries.lock().unwrap() = all.into_iter().map(|(_, v)| v).collect();
        *self.records.lock().unwrap() = Some(records.clone());
        Ok(())
    }

    /// The legacy format: the JSON list of entries.
    fn import(&self, legacy: &[u8], changes: &mut Changes) -> Result<(), String> {
        let entries: Vec<Vec<u8>> = serde_json::from_slice(legacy).map_err(|e| e.to_string())?;
        for (i, entry) in entries.into_iter().enumerate() {
            changes.put(key(i as u64 + 1), entry);
        }
        Ok(())
    }
}
