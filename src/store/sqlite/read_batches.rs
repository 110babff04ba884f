//! Session checks and agent lookups, read together: every call an agent
//! makes reads its task and agent, every task open its agent, and each read
//! is a trip to a read connection's SQLite thread (two thread wake-ups).
//! Reads of one kind that arrive while one is being read are read with the
//! next: one statement for all their ids, on one connection. At most
//! [`READING`] batches of a kind are read at once; a request that finds
//! fewer starts one, so alone it waits for nobody. Each batch is read after
//! its requests arrived, from the committed state, as a read of its own
//! would be: a task ended or an agent suspended before a request's read is
//! seen by it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sqlx::{Column, Row};
use tokio::sync::oneshot;

use super::reads::Reads;
use crate::model::{Agent, Task};
use crate::store::rows::{agent_from_row, task_from_row};
use crate::store::{StoreError, StoreResult};

/// Batches read at once (a read connection each).
const READING: usize = 2;
/// Most tasks one batch reads.
const MAX_BATCH: usize = 256;

/// What one kind of batched read finds for each id.
pub(super) trait Kind: Send + Sync + 'static {
    type Found: Clone + Send + 'static;
    /// What exists of `ids`, by id; one trip.
    fn read<'a>(
        reads: &'a Reads,
        ids: String,
    ) -> impl std::future::Future<Output = StoreResult<HashMap<String, Self::Found>>> + Send + 'a;
}

/// A task with its agent, by task id (the session check).
pub(super) struct TaskWithAgent;
/// An agent, by id.
pub(super) struct AgentById;

/// Reads of one kind waiting to be read.
pub(super) struct Batched<K: Kind> {
    queue: Mutex<Queue<K::Found>>,
}

impl<K: Kind> Default for Batched<K> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                reading: 0,
            }),
        }
    }
}

type Answer<F> = oneshot::Sender<StoreResult<Option<F>>>;

struct Queue<F> {
    waiting: Vec<(String, Answer<F>)>,
    /// Batches being read.
    reading: usize,
}

impl<K: Kind> Batched<K> {
    fn queue(&self) -> MutexGuard<'_, Queue<K::Found>> {
        // Nothing panics while holding it; a poisoned queue is still whole.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `id` names, read with the other reads of its kind waiting.
    pub(super) async fn get(
        self: &Arc<Self>,
        reads: &Reads,
        id: &str,
    ) -> StoreResult<Option<K::Found>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue();
            q.waiting.push((id.to_owned(), tx));
            let start = q.reading < READING;
            q.reading += usize::from(start);
            start
        };
        if start {
            // A task of its own: a request cancelled mid-read must not take
            // the others' answers with it.
            tokio::spawn(Arc::clone(self).read_while_waiting(reads.clone()));
        }
        rx.await
            .map_err(|_| StoreError::Database("the read was abandoned".into()))?
    }

    /// Reads batches until nobody waits.
    async fn read_while_waiting(self: Arc<Self>, reads: Reads) {
        loop {
            let batch: Vec<_> = {
                let mut q = self.queue();
                if q.waiting.is_empty() {
                    q.reading -= 1;
                    return;
                }
                let n = q.waiting.len().min(MAX_BATCH);
                q.waiting.drain(..n).collect()
            };
            match read_batch::<K>(&reads, batch.iter().map(|(id, _)| id.as_str())).await {
                Ok(mut found) => {
                    // An id asked for twice in one batch is answered twice.
                    let mut asks: HashMap<String, usize> = HashMap::new();
                    for (id, _) in &batch {
                        *asks.entry(id.clone()).or_default() += 1;
                    }
                    for (id, reply) in batch {
                        let last = asks.get_mut(&id).is_some_and(|n| {
                            *n -= 1;
                            *n == 0
                        });
                        let answer = if last {
                            found.remove(&id)
                        } else {
                            found.get(&id).cloned()
                        };
                        // A request cancelled meanwhile needs no answer.
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (_, reply) in batch {
                        let _ = reply.send(Err(StoreError::Database(msg.clone())));
                    }
                }
            }
        }
    }
}

/// What exists of `ids`, by id; one trip.
async fn read_batch<'a, K: Kind>(
    reads: &Reads,
    ids: impl Iterator<Item = &'a str>,
) -> StoreResult<HashMap<String, K::Found>> {
    let ids = serde_json::to_string(&ids.collect::<Vec<_>>())
        .map_err(|e| StoreError::Database(e.to_string()))?;
    K::read(reads, ids).await
}

impl Kind for AgentById {
    type Found = Agent;
    async fn read(reads: &Reads, ids: String) -> StoreResult<HashMap<String, Agent>> {
        let rows =
            sqlx::query("SELECT * FROM agents WHERE id IN (SELECT value FROM json_each(?1))")
                .bind(ids)
                .fetch_all(&mut *reads.get().await?)
                .await?;
        rows.iter()
            .map(|r| agent_from_row(r).map(|a| (a.id.clone(), a)))
            .collect()
    }
}

impl Kind for TaskWithAgent {
    type Found = (Task, Option<Agent>);
    async fn read(reads: &Reads, ids: String) -> StoreResult<HashMap<String, Self::Found>> {
        read_tasks_with_agents(reads, ids).await
    }
}

/// Each task of `ids` (a JSON array) that exists, with its agent.
async fn read_tasks_with_agents(
    reads: &Reads,
    ids: String,
) -> StoreResult<HashMap<String, (Task, Option<Agent>)>> {
    let rows = sqlx::query(
        "SELECT * FROM tasks WHERE id IN (SELECT value FROM json_each(?1)); \
         SELECT * FROM agents WHERE id IN \
         (SELECT agent_id FROM tasks WHERE id IN (SELECT value FROM json_each(?1)))",
    )
    .bind(ids)
    .fetch_all(&mut *reads.get().await?)
    .await?;
    let mut tasks = Vec::new();
    let mut agents = HashMap::new();
    for r in &rows {
        // Only a task's row has `agent_id`.
        if r.columns().iter().any(|c| c.name() == "agent_id") {
            tasks.push(task_from_row(r)?);
        } else {
            let a = agent_from_row(r)?;
            agents.insert(a.id.clone(), a);
        }
    }
    Ok(tasks
        .into_iter()
        .map(|t| {
            let agent = agents.get(&t.agent_id).cloned();
            (t.id.clone(), (t, agent))
        })
        .collect())
}
