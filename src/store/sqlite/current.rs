//! Session checks and task opens answered from memory while nothing they
//! read can have changed.
//!
//! Every call an agent makes reads its task and agent, and every task open
//! its agent: a trip to a read connection's SQLite thread each, which alone
//! costs more than the rest of a check. The file serves one process (the
//! lock of `register_replica`), so every change to it is made by this
//! process's writer, and the writer counts the groups that change anything
//! (`group.rs`: a transaction kept in a group; a batch of task opens that
//! moves an agent's `last_used_at`, `batch.rs`). Lease writes and new tasks
//! change no row remembered here, so they do not count.
//!
//! A row is remembered with the count read **before** it was read, and
//! answered only while the count is the same. The writer counts a group
//! after its commit and before anyone waiting on it learns it is done, so
//! a change's caller returns only once every row read before it is
//! forgotten: the kill switch, a suspension or an ended task is seen by the
//! next check exactly as a read would see it. A row read between a commit
//! and its count is newer than the count it is kept with: forgotten early,
//! never late. What does not exist is not remembered (a task open may
//! create it without a count).
//!
//! Only these two reads use it; every other read goes to the file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::model::{Agent, Task};

/// Most tasks (and, apart, agents) remembered; past it, they are forgotten
/// and read again.
const KEEP: usize = 20_000;

/// Tasks and agents as read at the writer's last count.
pub(super) struct Current {
    /// The writer's count of groups that changed something.
    changes: Arc<AtomicU64>,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// The count these rows were read at.
    at: u64,
    tasks: HashMap<String, Task>,
    agents: HashMap<String, Agent>,
}

impl Current {
    pub(super) fn new(changes: Arc<AtomicU64>) -> Self {
        Self {
            changes,
            known: Mutex::default(),
        }
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The count to read at: take it before reading the rows it will be
    /// kept with.
    pub(super) fn count(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// A task and its agent, if both were read at the current count.
    pub(super) fn task_with_agent(&self, id: &str) -> Option<(Task, Option<Agent>)> {
        let at = self.count();
        let k = self.known();
        let task = k.tasks.get(id).filter(|_| k.at == at)?;
        let agent = k.agents.get(&task.agent_id)?;
        Some((task.clone(), Some(agent.clone())))
    }

    /// An agent, if read at the current count.
    pub(super) fn agent(&self, id: &str) -> Option<Agent> {
        let at = self.count();
        let k = self.known();
        k.agents.get(id).filter(|_| k.at == at).cloned()
    }

    /// Remembers what was read at count `at` (nothing if the writer has
    /// counted a change since).
    pub(super) fn remember(&self, at: u64, task: Option<&Task>, agent: Option<&Agent>) {
        let mut k = self.known();
        if at > k.at {
            *k = Known {
                at,
                ..Known::default()
            };
        }
        if at != k.at || at != self.count() {
            return;
        }
        if let Some(t) = task {
            if k.tasks.len() >= KEEP {
                k.tasks.clear();
            }
            k.tasks.insert(t.id.clone(), t.clone());
        }
        if let Some(a) = agent {
            if k.agents.len() >= KEEP {
                k.agents.clear();
            }
            k.agents.insert(a.id.clone(), a.clone());
        }
    }
}
