//! The audit log kept by [`MemoryStore`](super::MemoryStore): every change
//! appends its event under the same lock as the change. Written by the key
//! and tenant store (`memory.rs`) and the console store (`console_memory.rs`).

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::domain::console::AuditEvent;

/// Audit events by id (v7: time order).
#[derive(Default)]
pub(in crate::store) struct AuditLog {
    events: BTreeMap<Uuid, AuditEvent>,
}

impl AuditLog {
    pub(in crate::store) fn record(&mut self, e: AuditEvent) {
        self.events.insert(e.id, e);
    }

    /// Every event, newest first.
    pub(in crate::store) fn newest_first(&self) -> impl Iterator<Item = &AuditEvent> {
        self.events.values().rev()
    }
}
