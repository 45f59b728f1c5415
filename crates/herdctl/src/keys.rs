//! `herdctl keys`: quote-signing keys, whose private halves live in files given to the gateways
//! (`--secrets DIR`) and whose public halves live in the `keys` section (see
//! [`herd_model::keys`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use herd::layout::Layout;
use serde_json::{Value, json};

/// Quote-signing keys.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new private key as DIR/ID.pem and print the entry to add to the keys section
    /// (inactive: activate it once every gateway holds the file).
    New {
        /// The key's id.
        id: String,
        /// The gateways' secrets folder.
        #[arg(long = "secrets", value_name = "DIR")]
        dir: PathBuf,
    },
    /// Move the private keys of a keys section written by an earlier version (`secret` in etcd)
    /// into DIR/<id>.pem, then rewrite the section with public keys only (compare-and-swap).
    Export {
        /// The gateways' secrets folder.
        #[arg(long = "secrets", value_name = "DIR")]
        dir: PathBuf,
    },
}

impl KeysCommand {
    /// Whether the command reads or writes etcd.
    pub fn needs_etcd(&self) -> bool {
        matches!(self, Self::Export { .. })
    }
}

/// Runs one `herdctl keys` command.
pub async fn run(
    client: Option<Client>,
    layout: &Layout,
    command: KeysCommand,
) -> anyhow::Result<()> {
    match command {
        KeysCommand::New { id, dir } => {
            let secret: [u8; 32] = rand::random();
            let entry = new_key(&dir, &id, &secret)?;
            println!("{entry}");
            Ok(())
        }
        KeysCommand::Export { dir } => {
            let client = client.context("this command needs etcd")?;
            export(client, layout, &dir).await
        }
    }
}

/// Writes `secret` as `dir/<id>.pem`, refusing to replace a key already there; returns the
/// section entry of its public key (inactive).
pub fn new_key(dir: &Path, id: &str, secret: &[u8; 32]) -> anyhow::Result<Value> {
    let path = dir.join(format!("{id}.pem"));
    anyhow::ensure!(
        !path.exists(),
        "{} exists: a key id is never reused",
        path.display()
    );
    herd_model::keys::write_key(dir, id, secret)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote   {}", path.display());
    Ok(json!({"id": id, "public": herd_model::keys::public_of(secret), "active": false}))
}

async fn export(mut client: Client, layout: &Layout, dir: &Path) -> anyhow::Result<()> {
    use base64::Engine;
    let key = layout.config("keys");
    let resp = client.get(key.as_str(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .with_context(|| format!("{key} is not set"))?;
    let mut section: Value =
        serde_json::from_slice(kv.value()).with_context(|| format!("{key}: not JSON"))?;
    let entries = section["keys"]
        .as_array_mut()
        .with_context(|| format!("{key}: no \"keys\" list"))?;
    let mut moved = 0;
    for (i, entry) in entries.iter_mut().enumerate() {
        let Some(object) = entry.as_object_mut() else {
            anyhow::bail!("{key}: keys[{i}] is not an object");
        };
        let Some(secret) = object.remove("secret") else {
            continue;
        };
        let id = object
            .get("id")
            .and_then(Value::as_str)
            .with_context(|| format!("{key}: keys[{i}].id missing"))?
            .to_string();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret.as_str().unwrap_or_default().trim())
            .with_context(|| format!("{key}: keys[{i}].secret is not base64"))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{key}: keys[{i}].secret is not 32 bytes"))?;
        let path = herd_model::keys::write_key(dir, &id, &secret)
            .with_context(|| format!("writing {id}.pem into {}", dir.display()))?;
        eprintln!("wrote   {}", path.display());
        object.insert("public".into(), herd_model::keys::public_of(&secret).into());
        moved += 1;
    }
    if moved == 0 {
        println!("{key} holds no private key: nothing to export");
        return Ok(());
    }
    let value = serde_json::to_string(&section)?;
    herd::config::parse_section::<herd_model::sections::SigningKeys>(value.as_bytes())
        .map_err(|e| anyhow::anyhow!("the exported section is not valid: {e}"))?;
    // Only if nobody wrote the section meanwhile.
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::put(key.as_str(), value, None)]);
    anyhow::ensure!(
        client.txn(txn).await?.succeeded(),
        "{key} changed while it was exported: run it again (the files written are the same keys)"
    );
    println!(
        "{key}: {moved} private key(s) moved to {}; etcd holds public keys only",
        dir.display()
    );
    Ok(())
}
