//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the
//! migration directories at compile time but does not tell Cargo to watch
//! them (sqlx's documented advice is this build script).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
