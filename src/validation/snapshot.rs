//! What agents learned, saved to the store and read back: the broker saves
//! the agents that changed every `snapshot_secs` and at a graceful stop,
//! and restores them at start.

use super::{Learned, MAX_AGENTS, Validation};

/// One agent's saved learning, as the store keeps it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub agent: String,
    /// JSON; names, networks and counts, never a secret.
    pub state: String,
}

impl Validation {
    /// What agents learned since the last call, to save (marked saved).
    pub fn take_snapshots(&self) -> Vec<Snapshot> {
        let Ok(mut agents) = self.agents.lock() else {
            return Vec::new();
        };
        agents
            .iter_mut()
            .filter(|(_, a)| a.dirty)
            .filter_map(|(id, a)| {
                a.dirty = false;
                Some(Snapshot {
                    agent: id.clone(),
                    state: serde_json::to_string(&a.learned).ok()?,
                })
            })
            .collect()
    }

    /// Marks agents whose snapshot could not be written as changed, so the
    /// next pass writes them.
    pub fn unsaved(&self, snapshots: &[Snapshot]) {
        if let Ok(mut agents) = self.agents.lock() {
            for s in snapshots {
                if let Some(a) = agents.get_mut(&s.agent) {
                    a.dirty = true;
                }
            }
        }
    }

    /// Puts back what was saved (before any observation). A snapshot this
    /// version cannot read is dropped: the agent learns again.
    pub fn restore(&self, saved: Vec<Snapshot>) -> usize {
        let Ok(mut agents) = self.agents.lock() else {
            return 0;
        };
        let mut n = 0;
        for s in saved {
            let Ok(mut learned) = serde_json::from_str::<Learned>(&s.state) else {
                tracing::warn!(agent = %s.agent, "a continuous validation snapshot could not be read; the agent learns again");
                continue;
            };
            if learned.baseline.as_ref().is_some_and(|b| !b.well_formed()) {
                learned.baseline = None;
            }
            if agents.len() >= MAX_AGENTS {
                break;
            }
            agents.entry(s.agent).or_default().learned = learned;
            n += 1;
        }
        n
    }
}
