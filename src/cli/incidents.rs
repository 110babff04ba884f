//! `keygate incidents list|show|resolve`.

use reqwest::Method;

use super::IncidentsCmd;
use super::client::Client;
use super::commands::print_json;

pub async fn run(c: &Client, cmd: IncidentsCmd) -> anyhow::Result<()> {
    let v = match cmd {
        IncidentsCmd::List { agent, open } => {
            let mut q = vec![("open", open.to_string())];
            if let Some(a) = agent {
                q.push(("agent", a));
            }
            c.json(c.request(Method::GET, "/v1/incidents").query(&q))
                .await?
        }
        IncidentsCmd::Show { id } => {
            c.json(c.request(Method::GET, &format!("/v1/incidents/{id}")))
                .await?
        }
        IncidentsCmd::Resolve { id, reason } => {
            let body = serde_json::json!({ "reason": reason });
            c.json(
                c.request(Method::POST, &format!("/v1/incidents/{id}/resolve"))
                    .json(&body),
            )
            .await?
        }
    };
    print_json(&v)
}
