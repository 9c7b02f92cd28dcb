//! A tiny replicated journal used to exercise storage and transport on their own:
//! every entry is kept as a record under its index, so replicas can be compared entry
//! by entry.

use std::sync::Mutex;

use switchboard_raft::{Changes, Machine, Records};

#[derive(Default)]
pub struct Journal {
    pub entries: Mutex<Vec<Vec<u8>>>,
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
        (entries.len() as u64).to_be_bytes().to_vec()
    }

    fn load(&self, records: &Records) -> Result<(), String> {
        let all = records.scan(b"e", None, usize::MAX).map_err(|e| e.to_string())?;
        *self.entries.lock().unwrap() = all.into_iter().map(|(_, v)| v).collect();
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
