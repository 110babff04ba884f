//! The batch's SQL: the temporary view and triggers a batch's rows are
//! inserted into, the refusal that stops its statement, and the rows of
//! tasks, leases and events bound into it (also the single-row inserts the
//! interactive paths share).

use sqlx::query_builder::Separated;
use sqlx::{QueryBuilder, Sqlite};

use super::super::group::{self, PendingEvent};
use crate::model::{Lease, Task, unix};
use crate::store::sql::json_opt;
use crate::store::{JtiUse, StoreError, StoreResult};

/// The message of the check that stops a batch's statement before its commit.
macro_rules! refused {
    () => {
        "keygate: a member of the batch was refused"
    };
}
const REFUSED: &str = refused!();

/// Creates, on the writer's connection, the view a batch's rows are
/// inserted into, in one statement: its triggers write each row where it
/// belongs, and stop the statement (with [`REFUSED`]) on a task whose
/// agent is not active or whose parent task is not open (a suspension, the
/// kill switch or the parent's end committed after the request read them),
/// a `jti` seen before, or a lease whose task is not open. An agent's
/// `last_used_at` is rewritten only when it moves (once a second at most):
/// its page is not written again with every group. Temporary: they live
/// with the connection, in memory.
pub(in crate::store::sqlite) const BATCH_ROWS: &str = concat!(
    "CREATE TEMP VIEW IF NOT EXISTS batch_rows \
     (kind, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17) AS \
     SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
     NULL, NULL, NULL, NULL, NULL; \
     CREATE TEMP TRIGGER IF NOT EXISTS batch_open INSTEAD OF INSERT ON batch_rows \
     WHEN NEW.kind = 'open' BEGIN \
     SELECT raise(ABORT, '",
    refused!(),
    "') WHERE NOT EXISTS (SELECT 1 FROM agents WHERE id = NEW.c5 AND status = 'active') \
     OR (NEW.c10 IS NOT NULL AND NOT EXISTS \
     (SELECT 1 FROM tasks WHERE id = NEW.c10 AND state = 'open')); \
     INSERT INTO assertion_jtis (agent_id, jti, expires_at) VALUES (NEW.c1, NEW.c2, NEW.c3) \
     ON CONFLICT DO NOTHING; \
     SELECT raise(ABORT, '",
    refused!(),
    "') WHERE changes() = 0; \
     INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at, \
     parent_task_id, depth, delegation_budget, scopes, chain, on_behalf_of) VALUES \
     (NEW.c4, NEW.c5, NEW.c6, NEW.c7, NEW.c8, NEW.c9, NEW.c10, NEW.c11, NEW.c12, NEW.c13, \
     NEW.c14, NEW.c15); \
     UPDATE agents SET last_used_at = NEW.c16 WHERE id = NEW.c5 \
     AND last_used_at IS NOT NEW.c16; \
     END; \
     CREATE TEMP TRIGGER IF NOT EXISTS batch_lease INSTEAD OF INSERT ON batch_rows \
     WHEN NEW.kind = 'lease' BEGIN \
     INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, \
     expires_at, boot_id, source, handle, revocability) SELECT NEW.c1, NEW.c2, NEW.c3, \
     NEW.c4, NEW.c5, NEW.c6, NEW.c7, NEW.c8, NEW.c9, NEW.c10, NEW.c11, NEW.c12 \
     WHERE EXISTS (SELECT 1 FROM tasks WHERE id = NEW.c3 AND state = 'open'); \
     SELECT raise(ABORT, '",
    refused!(),
    "') WHERE changes() = 0; \
     END; \
     CREATE TEMP TRIGGER IF NOT EXISTS batch_event INSTEAD OF INSERT ON batch_rows \
     WHEN NEW.kind = 'event' BEGIN \
     INSERT INTO audit_events (seq, at_ms, actor, action, agent, task, scope, lease, \
     decision, policy_ids, policy_hash, outcome, reason, details, prev_hash, hash, \
     on_behalf_of) VALUES (NEW.c1, NEW.c2, NEW.c3, NEW.c4, NEW.c5, NEW.c6, NEW.c7, NEW.c8, \
     NEW.c9, NEW.c10, NEW.c11, NEW.c12, NEW.c13, NEW.c14, NEW.c15, NEW.c16, NEW.c17); \
     END"
);

pub(super) fn is_refusal(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message() == REFUSED)
}

pub(super) fn is_constraint(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() != sqlx::error::ErrorKind::Other)
}

/// A row of a batch's statement ([`BATCH_ROWS`]), made as it is bound.
#[allow(clippy::large_enum_variant)] // never stored: one at a time
enum Row<'a> {
    /// A task open: its `jti`, its task, when its agent was used.
    Open(&'a JtiUse, TaskRow<'a>, Option<i64>),
    Lease(LeaseRow<'a>),
    Event(PendingEvent),
}

/// Appends the batch's one statement: the task opens (each `jti` recorded
/// unless seen, the task written, its agent marked used at `used`), the
/// leases (each only while its task is open), then the chained `events`.
pub(super) fn push_rows(
    q: &mut QueryBuilder<Sqlite>,
    opens: &[&(JtiUse, Task)],
    used: Option<i64>,
    leases: &[&Lease],
    events: Vec<PendingEvent>,
) -> StoreResult<()> {
    let opens = opens
        .iter()
        .map(|o| Ok((&o.0, task_row(&o.1)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    let leases = leases
        .iter()
        .map(|l| lease_row(l))
        .collect::<StoreResult<Vec<_>>>()?;
    if opens.is_empty() && leases.is_empty() && events.is_empty() {
        return Ok(());
    }
    let rows = (opens.into_iter().map(|(j, t)| Row::Open(j, t, used)))
        .chain(leases.into_iter().map(Row::Lease))
        .chain(events.into_iter().map(Row::Event));
    q.push(
        "INSERT INTO temp.batch_rows \
         (kind, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17) ",
    );
    q.push_values(rows, |mut v, row| {
        // The columns a kind leaves unused are NULL.
        let unused = match row {
            Row::Open(j, t, used) => {
                v.push("'open'")
                    .push_bind(j.agent_id.clone())
                    .push_bind(j.jti.clone())
                    .push_bind(unix(j.expires_at));
                bind_task(&mut v, t);
                v.push_bind(used);
                1
            }
            Row::Lease(l) => {
                v.push("'lease'");
                bind_lease(&mut v, l);
                5
            }
            Row::Event(e) => {
                v.push("'event'");
                group::bind_event(&mut v, e);
                0
            }
        };
        for _ in 0..unused {
            v.push("NULL");
        }
    });
    q.push("; ");
    Ok(())
}

/// A task's row, its JSON columns encoded.
struct TaskRow<'a> {
    t: &'a Task,
    scopes: Option<String>,
    chain: String,
    on_behalf_of: Option<String>,
}

fn task_row(t: &Task) -> StoreResult<TaskRow<'_>> {
    Ok(TaskRow {
        t,
        scopes: json_opt(t.scopes.as_ref())?,
        chain: serde_json::to_string(&t.chain).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        on_behalf_of: json_opt(t.on_behalf_of.as_ref())?,
    })
}

/// Binds the 12 columns of a task's row, in [`push_task_insert`]'s order.
fn bind_task(v: &mut Separated<'_, Sqlite, &'static str>, r: TaskRow<'_>) {
    let t = r.t;
    v.push_bind(t.id.clone())
        .push_bind(t.agent_id.clone())
        .push_bind(t.description.clone())
        .push_bind(t.state.as_str())
        .push_bind(unix(t.opened_at))
        .push_bind(unix(t.expires_at))
        .push_bind(t.parent_task_id.clone())
        .push_bind(i64::from(t.depth))
        .push_bind(i64::from(t.delegation_budget))
        .push_bind(r.scopes)
        .push_bind(r.chain)
        .push_bind(r.on_behalf_of);
}

/// One statement writing `t` only while its agent is active and its
/// parent task (if any) open, as the batch's trigger ([`BATCH_ROWS`]) checks.
pub(in crate::store::sqlite) fn push_task_insert(
    q: &mut QueryBuilder<Sqlite>,
    t: &Task,
) -> StoreResult<()> {
    let row = task_row(t)?;
    q.push(
        "INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at, \
         parent_task_id, depth, delegation_budget, scopes, chain, on_behalf_of) SELECT ",
    );
    bind_task(&mut q.separated(", "), row);
    q.push(" WHERE EXISTS (SELECT 1 FROM agents WHERE id = ")
        .push_bind(t.agent_id.clone())
        .push(" AND status = 'active') AND (")
        .push_bind(t.parent_task_id.clone())
        .push(" IS NULL OR EXISTS (SELECT 1 FROM tasks WHERE id = ")
        .push_bind(t.parent_task_id.clone())
        .push(" AND state = 'open'))");
    Ok(())
}

/// Whether the registry of a lease's agent excludes its scope (an
/// expression over `leases`).
pub(super) const EXCLUDED: &str = "EXISTS (SELECT 1 FROM agents, json_each(agents.excluded_scopes) AS x \
     WHERE agents.id = leases.agent_id AND x.key = leases.scope \
     AND json_extract(x.value, '$.lifted_at') IS NULL)";

/// A lease's row, its handle encoded.
struct LeaseRow<'a> {
    l: &'a Lease,
    handle: Option<String>,
}

fn lease_row(l: &Lease) -> StoreResult<LeaseRow<'_>> {
    Ok(LeaseRow {
        l,
        handle: json_opt(l.handle.as_ref())?,
    })
}

/// Binds the 12 columns of a lease's row, in [`push_lease_inserts`]' order.
fn bind_lease(v: &mut Separated<'_, Sqlite, &'static str>, r: LeaseRow<'_>) {
    let l = r.l;
    v.push_bind(l.id.clone())
        .push_bind(l.agent_id.clone())
        .push_bind(l.task_id.clone())
        .push_bind(l.scope.clone())
        .push_bind(l.provider.clone())
        .push_bind(l.state.as_str())
        .push_bind(unix(l.created_at))
        .push_bind(unix(l.expires_at))
        .push_bind(l.boot_id.clone())
        .push_bind(l.source.clone())
        .push_bind(r.handle)
        .push_bind(l.revocability.map(|r| r.as_str()));
}

/// One statement writing `leases` (each with what was issued, for an
/// in-process provider), each only while its task is open; it returns the
/// id of each lease written and whether its agent's registry excludes its
/// scope. The one writer runs it alone, so an exclusion committed before
/// it is seen here, and one committed after it finds these leases when it
/// scans the agent's live leases.
pub(in crate::store::sqlite) fn push_lease_inserts<'a>(
    q: &mut QueryBuilder<Sqlite>,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> StoreResult<()> {
    let rows = leases
        .into_iter()
        .map(lease_row)
        .collect::<StoreResult<Vec<_>>>()?;
    q.push(
        "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, \
         expires_at, boot_id, source, handle, revocability) SELECT * FROM (",
    );
    q.push_values(rows, |mut v, r| bind_lease(&mut v, r));
    q.push(") AS v WHERE EXISTS (SELECT 1 FROM tasks WHERE id = v.column3 AND state = 'open')");
    q.push(" RETURNING id, ")
        .push(EXCLUDED)
        .push(" AS excluded");
    Ok(())
}
