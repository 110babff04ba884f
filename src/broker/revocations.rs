//! Emergency revocation: the SecOps kill switch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fences::FenceFailure;
use super::{Broker, BrokerError, BrokerResult};
use crate::audit::{Actor, AuditEvent};
use crate::model::{
    AgentStatus, FenceFilter, FenceRecord, Revocation, RevocationProgress, Selector, TaskState,
    new_id, now,
};
use crate::store::{LeaseSelector, TaskSelector};

/// Most seconds a kill switch or a look at its progress waits for its
/// leases to be settled before answering.
pub const MAX_WAIT: u64 = 60;

/// How often those waiting look whether a revocation is finished.
const LOOK_EVERY: Duration = Duration::from_millis(25);

/// What a kill switch wrote in its transaction, for what follows the
/// commit ([`Broker::after_revocation`]).
pub(crate) struct Pulled {
    id: String,
    selector: Selector,
    reason: String,
    tasks: Vec<String>,
    /// Leases of the ended tasks that the selector itself did not queue.
    others: Vec<String>,
    /// Leases queued in all.
    queued: usize,
    suspended: u64,
}

/// The latest look at whether each revocation still had leases to settle,
/// shared by everyone waiting on it: many waiting looks at one revocation
/// (an auditor's script, a console tab each) cost one index seek a
/// [`LOOK_EVERY`], not one each.
#[derive(Default)]
pub struct RevocationLooks(std::sync::Mutex<HashMap<String, (Instant, bool)>>);

impl RevocationLooks {
    fn looks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, bool)>> {
        // Only whole entries are written under it: a panic leaves none half-made.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The look at `id` made less than [`LOOK_EVERY`] ago, if any.
    fn recent(&self, id: &str) -> Option<bool> {
        let looks = self.looks();
        let (at, unfinished) = looks.get(id)?;
        (at.elapsed() < LOOK_EVERY).then_some(*unfinished)
    }

    fn record(&self, id: &str, unfinished: bool) {
        let mut looks = self.looks();
        // Old looks go as new ones come: the map holds the revocations
        // looked at in the last moment, a handful.
        looks.retain(|_, (at, _)| at.elapsed() < LOOK_EVERY);
        looks.insert(id.to_owned(), (Instant::now(), unfinished));
    }
}

/// `POST /v1/revocations` body: exactly one selector and a reason.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    pub agent: Option<String>,
    pub team: Option<String>,
    pub provider: Option<String>,
    #[serde(default)]
    pub all: bool,
    pub reason: Option<String>,
    /// Also suspend the matching agents so they cannot open new tasks
    /// (agent and team selectors only).
    #[serde(default)]
    pub suspend: bool,
    /// Where credentials cannot be revoked one by one (AWS STS), also fence
    /// every session issued before now on each affected role, whoever
    /// holds it, not only the hit agents' sessions.
    #[serde(default)]
    pub revoke_older_sessions: bool,
    /// Seconds to wait for providers to confirm before answering (default 5, at most 60).
    pub wait: Option<u64>,
}

/// What a revocation found and did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RevocationReport {
    pub revocation_id: String,
    pub selector: Selector,
    pub reason: String,
    /// Open tasks (session tokens) ended; their tokens fail from now on.
    pub tasks_ended: u64,
    pub agents_suspended: u64,
    #[serde(flatten)]
    pub leases: RevocationProgress,
    /// Barriers put up where credentials cannot be revoked one by one
    /// (deny policies on AWS roles), standing until lifted.
    pub fences: Vec<FenceRecord>,
    /// Fences that could not be put up (also in the audit log): the kill
    /// switch is incomplete there; repeating the revocation retries them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fence_failures: Vec<FenceFailure>,
}

impl RevocationRequest {
    pub fn selector(&self) -> BrokerResult<Selector> {
        let mut found = Vec::new();
        if let Some(a) = &self.agent {
            found.push(Selector::Agent(a.clone()));
        }
        if let Some(t) = &self.team {
            found.push(Selector::Team(t.clone()));
        }
        if let Some(p) = &self.provider {
            found.push(Selector::Provider(p.clone()));
        }
        if self.all {
            found.push(Selector::All);
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            _ => Err(BrokerError::InvalidRequest(
                "give exactly one of `agent`, `team`, `provider` or `all: true`".into(),
            )),
        }
    }
}

/// What a kill switch would revoke, found without pulling it.
#[derive(Debug, Clone)]
pub struct RevocationPreview {
    /// Every live lease it would revoke: the selector's, and those of the
    /// tasks it ends (their other providers', their sub-agents').
    pub leases: Vec<crate::model::Lease>,
    /// The open tasks it would end, delegated ones included.
    pub tasks: usize,
    /// The agents those leases and tasks are of.
    pub agents: std::collections::BTreeSet<String>,
}

impl Broker {
    /// What [`Broker::revoke`] on `selector` would revoke: the tasks it
    /// would end are found by ending them in a transaction that is then
    /// rolled back (the same statements, so delegated tasks are counted as
    /// the switch counts them); nothing changes.
    pub async fn revocation_preview(&self, selector: &Selector) -> BrokerResult<RevocationPreview> {
        let tasks = {
            let mut tx = self.store.begin().await?;
            let ended = tx
                .end_tasks(
                    &TaskSelector::Emergency(selector.clone()),
                    TaskState::Revoked,
                    "preview",
                    now(),
                )
                .await?;
            // Dropped, not committed: rolled back.
            drop(tx);
            ended
        };
        let mut leases = self.store.live_leases(selector).await?;
        let seen: std::collections::HashSet<String> = leases.iter().map(|l| l.id.clone()).collect();
        for l in self.store.live_leases_of_tasks(&tasks).await? {
            if !seen.contains(&l.id) {
                leases.push(l);
            }
        }
        let mut agents: std::collections::BTreeSet<String> =
            leases.iter().map(|l| l.agent_id.clone()).collect();
        agents.extend(
            self.store
                .tasks(&tasks)
                .await?
                .into_iter()
                .map(|t| t.agent_id),
        );
        Ok(RevocationPreview {
            leases,
            tasks: tasks.len(),
            agents,
        })
    }

    /// Ends every matching session and queues every matching live lease.
    pub async fn revoke(
        &self,
        operator: &str,
        req: RevocationRequest,
    ) -> BrokerResult<RevocationReport> {
        let (selector, reason) = self.checked_revocation(&req).await?;
        // The emergency path does not give up on a collision with another
        // change at the same moment (PostgreSQL rolls one of them back):
        // nothing of the attempt was kept, so it is run again.
        let mut attempt = 0;
        let pulled = loop {
            attempt += 1;
            match self
                .revoke_once(operator, &req, selector.clone(), reason.clone())
                .await
            {
                Err(e) if super::run_again("the kill switch", attempt, &e).await => {}
                done => break done?,
            }
        };
        let id = pulled.id.clone();
        self.after_revocation(operator, &req, pulled)
            .await
            .map_err(|e| match e {
                // Committed already: "retry" would pull it a second time.
                BrokerError::Unavailable(why) => BrokerError::Internal(format!(
                    "emergency revocation {id} is committed (sessions ended, leases queued), but what follows it failed: {why}"
                )),
                e => e,
            })
    }

    /// The kill switch's writes in a transaction of their own, committed.
    async fn revoke_once(
        &self,
        operator: &str,
        req: &RevocationRequest,
        selector: Selector,
        reason: String,
    ) -> BrokerResult<Pulled> {
        let mut tx = self.store.begin().await?;
        let pulled = self
            .revoke_in(&mut *tx, operator, req, selector, reason)
            .await?;
        tx.commit().await?;
        Ok(pulled)
    }

    /// The selector and reason of a kill switch, checked before anything is
    /// written.
    pub(crate) async fn checked_revocation(
        &self,
        req: &RevocationRequest,
    ) -> BrokerResult<(Selector, String)> {
        let selector = req.selector()?;
        let reason = super::required_reason(req.reason.as_deref())?;
        match &selector {
            Selector::Agent(a) => {
                self.agent(a).await?;
            }
            Selector::Provider(p) if self.registry.provider(p).is_none() => {
                return Err(BrokerError::NotFound(format!("no provider `{p}`")));
            }
            _ => {}
        }
        if req.suspend && !matches!(selector, Selector::Agent(_) | Selector::Team(_)) {
            return Err(BrokerError::InvalidRequest(
                "`suspend` applies to `agent` and `team` revocations only".into(),
            ));
        }
        Ok((selector, reason))
    }

    /// The kill switch's writes, in `tx` (committed by the caller, with
    /// whatever else must land with them: an incident that pulled it): the
    /// agents suspended, the tasks ended, the revocation recorded, the
    /// leases queued, audited. What follows the commit is
    /// [`Self::after_revocation`].
    pub(crate) async fn revoke_in(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        operator: &str,
        req: &RevocationRequest,
        selector: Selector,
        reason: String,
    ) -> BrokerResult<Pulled> {
        let actor = Actor::Operator(operator.to_owned());
        let t = now();
        let id = new_id("rv");
        let why = format!("emergency revocation {id}: {reason}");
        // Suspended before their tasks end: a task open racing this either
        // lands first and is ended below, or finds its agent suspended and
        // writes nothing (PostgreSQL: the agent's row lock orders them).
        let mut suspended = 0u64;
        if req.suspend {
            for agent in self.store.list_agents(None, None).await? {
                let hit = match &selector {
                    Selector::Agent(a) => &agent.id == a,
                    Selector::Team(team) => &agent.team == team,
                    _ => false,
                };
                if !hit {
                    continue;
                }
                // A pending agent is suspended too, and its provisioning
                // approvals end: granting one later must not activate it.
                let was = tx
                    .set_agent_status(
                        &agent.id,
                        &[AgentStatus::Active, AgentStatus::Pending],
                        AgentStatus::Suspended,
                        t,
                    )
                    .await?;
                if was.is_some() {
                    suspended += 1;
                }
                if was == Some(AgentStatus::Pending) {
                    self.cancel_provisioning(
                        &mut *tx,
                        &actor,
                        &agent.id,
                        &format!("agent suspended by {why}"),
                    )
                    .await?;
                }
            }
        }
        let tasks = tx
            .end_tasks(
                &TaskSelector::Emergency(selector.clone()),
                TaskState::Revoked,
                &why,
                t,
            )
            .await?;
        tx.insert_revocation(&Revocation {
            id: id.clone(),
            selector: selector.clone(),
            reason: reason.clone(),
            operator: operator.to_owned(),
            created_at: t,
            tasks_ended: tasks.len() as u64,
            agents_suspended: suspended,
            fence_failures: Vec::new(),
        })
        .await?;
        let mut queued = tx
            .queue_revocations(
                &LeaseSelector::Emergency(selector.clone()),
                &why,
                Some(&id),
                t,
            )
            .await?;
        // One rule for every way a task ends: all of its live leases are
        // queued in the same commit. A selector by provider ends whole tasks,
        // so their leases of other providers go too.
        let mut others = Vec::new();
        if !tasks.is_empty() {
            others = tx
                .queue_revocations(&LeaseSelector::Tasks(tasks.clone()), &why, Some(&id), t)
                .await?;
            queued.extend(others.iter().cloned());
        }
        tx.audit(
            AuditEvent::new(&actor, "revocation.emergency")
                .reason(reason.clone())
                .details(serde_json::json!({
                    "revocation_id": id, "selector": selector,
                    "tasks_ended": tasks.len(), "leases_queued": queued.len(),
                    "agents_suspended": suspended,
                })),
        )
        .await?;
        Ok(Pulled {
            id,
            selector,
            reason,
            tasks,
            others,
            queued: queued.len(),
            suspended,
        })
    }

    /// What follows a kill switch's commit: the revocation queue woken,
    /// the fences put up, and the wait for its leases' revocation.
    pub(crate) async fn after_revocation(
        &self,
        operator: &str,
        req: &RevocationRequest,
        pulled: Pulled,
    ) -> BrokerResult<RevocationReport> {
        let Pulled {
            id,
            selector,
            reason,
            tasks,
            others,
            queued,
            suspended,
        } = pulled;
        let actor = Actor::Operator(operator.to_owned());
        tracing::warn!(revocation = %id, selector = %selector, leases = queued, tasks = tasks.len(), "emergency revocation");
        self.leases.wake();
        // Sessions issued up to the end of this second count as older.
        let cut_off = now() + time::Duration::SECOND;
        let fenced = self
            .put_up_fences(&actor, &id, &selector, req.revoke_older_sessions, cut_off)
            .await?;
        // Leases in the tasks it ended that the selector's own fences do not
        // cover (other providers' in a provider's kill switch; sub-agents'
        // in the delegated tasks that ended with an agent's or a team's):
        // where their backend cannot revoke them one by one (STS), their
        // sessions are fenced as a policy change's are.
        let fence = self.uncovered_leases_of(&selector, &tasks, others).await?;
        if !fence.is_empty() {
            self.fence_sessions(&actor, &id, &fence).await;
        }
        self.await_revocation(&id, req.wait.unwrap_or(5)).await?;
        let leases = self.store.revocation_progress(&id).await?;
        Ok(RevocationReport {
            revocation_id: id,
            selector,
            reason,
            tasks_ended: tasks.len() as u64,
            agents_suspended: suspended,
            leases,
            fences: fenced.fences,
            fence_failures: fenced.failures,
        })
    }

    /// The leases being revoked (or outliving their revocation) in `tasks`
    /// that fences put up for `selector` do not cover, with `queued` (their
    /// ids, as the tasks' end queued them); none where no provider fences.
    /// An agent's or a team's fences cover its own tasks: only the delegated
    /// tasks of other agents below them are read.
    pub(super) async fn uncovered_leases_of(
        &self,
        selector: &Selector,
        tasks: &[String],
        queued: Vec<String>,
    ) -> BrokerResult<Vec<String>> {
        if matches!(selector, Selector::All)
            || !self.registry.providers().any(|(_, p)| p.puts_up_fences())
        {
            return Ok(Vec::new());
        }
        let team: std::collections::HashSet<String> = match selector {
            Selector::Team(t) => self
                .store
                .list_agents(None, None)
                .await?
                .into_iter()
                .filter(|a| &a.team == t)
                .map(|a| a.id)
                .collect(),
            _ => Default::default(),
        };
        let covers_agent = |agent: &str| match selector {
            Selector::Agent(a) => a == agent,
            Selector::Team(_) => team.contains(agent),
            _ => false,
        };
        let mut leases = Vec::new();
        for id in queued {
            leases.extend(self.store.get_lease(&id).await?);
        }
        for task in tasks {
            if !matches!(selector, Selector::Provider(_))
                && self
                    .store
                    .get_task(task)
                    .await?
                    .is_none_or(|t| covers_agent(&t.agent_id))
            {
                continue;
            }
            leases.extend(self.revoking_leases_of(task).await?);
        }
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<String> = Vec::new();
        for l in leases {
            let covered = match selector {
                Selector::Provider(p) => &l.provider == p,
                _ => covers_agent(&l.agent_id),
            };
            if !covered && seen.insert(l.id.clone()) {
                out.push(l.id);
            }
        }
        Ok(out)
    }

    /// The leases of `task` being revoked, or already found to outlive
    /// their revocation (`expiring`: STS sessions, once the worker asked),
    /// every page of them.
    async fn revoking_leases_of(&self, task: &str) -> BrokerResult<Vec<crate::model::Lease>> {
        use crate::model::LeaseState;
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_leases(&crate::model::LeaseFilter {
                    task: Some(task.to_owned()),
                    cursor: cursor.take(),
                    ..Default::default()
                })
                .await?;
            let full = page.len() == crate::model::MAX_PAGE as usize;
            cursor = page
                .last()
                .filter(|_| full)
                .map(|l| crate::model::Cursor::of(l.created_at, &l.id));
            out.extend(
                page.into_iter()
                    .filter(|l| matches!(l.state, LeaseState::Revoking | LeaseState::Expiring)),
            );
            if cursor.is_none() {
                return Ok(out);
            }
        }
    }

    /// Waits until every lease of revocation `id` is settled (revoked,
    /// expired or expiring) or `wait` seconds (at most [`MAX_WAIT`]) pass,
    /// or the server begins to stop.
    async fn await_revocation(&self, id: &str, wait: u64) -> BrokerResult<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(MAX_WAIT));
        while !self.stopping.has_begun()
            && self.revocation_unfinished(id).await?
            && tokio::time::Instant::now() < deadline
        {
            self.stopping.sleep(LOOK_EVERY).await;
        }
        Ok(())
    }

    /// Whether revocation `id` still has leases to settle: an index seek,
    /// not a count (counting 100,000 leases every 25 ms took a core from
    /// the revocations being waited for), and one a [`LOOK_EVERY`] for
    /// everyone waiting on it, however many wait.
    async fn revocation_unfinished(&self, id: &str) -> BrokerResult<bool> {
        if let Some(unfinished) = self.revocation_looks.recent(id) {
            return Ok(unfinished);
        }
        let unfinished = self.store.revocation_unfinished(id).await?;
        self.revocation_looks.record(id, unfinished);
        Ok(unfinished)
    }

    /// Progress of an earlier revocation, once every lease is settled or
    /// after `wait` seconds (at most [`MAX_WAIT`]; `0`: at once).
    pub async fn revocation_status(&self, id: &str, wait: u64) -> BrokerResult<RevocationReport> {
        let r = self
            .store
            .get_revocation(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no revocation `{id}`")))?;
        self.await_revocation(id, wait).await?;
        let of_revocation = FenceFilter {
            revocation: Some(id.to_owned()),
            ..FenceFilter::default()
        };
        Ok(RevocationReport {
            leases: self.store.revocation_progress(id).await?,
            fences: self.store.list_fences(&of_revocation).await?,
            fence_failures: r.fence_failures,
            revocation_id: r.id,
            selector: r.selector,
            reason: r.reason,
            tasks_ended: r.tasks_ended,
            agents_suspended: r.agents_suspended,
        })
    }
}
