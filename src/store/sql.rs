//! SQL fragments both engines build the same way (`QueryBuilder` writes each
//! engine's placeholders itself).

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{StoreError, StoreResult};
use crate::model::Selector;

/// An optional value as its JSON column (`None` stays NULL).
pub(super) fn json_opt<T: serde::Serialize>(v: Option<&T>) -> StoreResult<Option<String>> {
    v.map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The page of a newest-first list: rows after `cursor` (`created_at`, then
/// `id`), ordered, at most `page_size(limit)`.
pub(super) fn push_page<DB: Database>(
    q: &mut QueryBuilder<DB>,
    cursor: Option<&str>,
    limit: Option<u32>,
) -> StoreResult<()>
where
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
{
    if let Some(c) = cursor {
        let c = crate::model::Cursor::parse(c).map_err(StoreError::Invalid)?;
        q.push(" AND (created_at < ")
            .push_bind(c.created_at)
            .push(" OR (created_at = ")
            .push_bind(c.created_at)
            .push(" AND id < ")
            .push_bind(c.id)
            .push("))");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(crate::model::page_size(limit)));
    Ok(())
}

/// The condition matching live leases (or tasks) of an emergency selector.
pub(super) fn push_selector<DB: Database>(q: &mut QueryBuilder<DB>, sel: &Selector, agent_col: &str)
where
    for<'t> String: Encode<'t, DB> + Type<DB>,
{
    match sel {
        Selector::Agent(a) => {
            q.push(format!(" AND {agent_col} = ")).push_bind(a.clone());
        }
        Selector::Team(t) => {
            q.push(format!(
                " AND {agent_col} IN (SELECT id FROM agents WHERE team = "
            ))
            .push_bind(t.clone())
            .push(")");
        }
        Selector::Provider(p) => {
            q.push(" AND provider = ").push_bind(p.clone());
        }
        Selector::All => {}
    }
}

/// `sel`'s condition on `tasks`, after a `WHERE`.
pub(super) fn push_task_selector<DB: Database>(
    q: &mut QueryBuilder<DB>,
    sel: &crate::store::TaskSelector,
) where
    for<'t> String: Encode<'t, DB> + Type<DB>,
{
    use crate::store::TaskSelector;
    match sel {
        TaskSelector::Task(id) => {
            q.push(" AND id = ").push_bind(id.clone());
        }
        TaskSelector::Emergency(Selector::Provider(p)) => {
            q.push(
                " AND id IN (SELECT task_id FROM leases WHERE state IN \
                 ('pending','active','revoking','expiring') AND provider = ",
            )
            .push_bind(p.clone())
            .push(")");
        }
        TaskSelector::Emergency(s) => push_selector(q, s, "agent_id"),
    }
}

/// The query of the live leases of `task_ids` (at most a few hundred: the
/// caller reads many in chunks), oldest first.
pub(super) fn live_leases_of_tasks<DB: Database>(task_ids: &[String]) -> QueryBuilder<DB>
where
    for<'t> String: Encode<'t, DB> + Type<DB>,
{
    let mut q = QueryBuilder::<DB>::new(
        "SELECT * FROM leases WHERE state IN ('pending', 'active', 'revoking', 'expiring') \
         AND task_id IN (",
    );
    let mut ids = q.separated(", ");
    for id in task_ids {
        ids.push_bind(id.clone());
    }
    q.push(") ORDER BY created_at, id");
    q
}
