//! A tiny replicated register used to exercise storage and transport on their own:
//! every entry is appended to a list, so replicas can be compared entry by entry.

use std::sync::Mutex;

use switchboard_raft::Machine;

#[derive(Default)]
pub struct Journal {
    pub entries: Mutex<Vec<Vec<u8>>>,
}

impl Machine for Journal {
    fn apply(&self, _index: u64, request: &[u8]) -> Vec<u8> {
        let mut entries = self.entries.lock().unwrap();
        entries.push(request.to_vec());
        (entries.len() as u64).to_be_bytes().to_vec()
    }

    fn capture(&self) -> switchboard_raft::SnapshotEncoder {
        let entries = self.entries.lock().unwrap().clone();
        Box::new(move || serde_json::to_vec(&entries).map_err(|e| e.to_string()))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        *self.entries.lock().unwrap() = serde_json::from_slice(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn reset(&self) {
        self.entries.lock().unwrap().clear();
    }
}
