//! What an instance says about itself in etcd: its registration record (under
//! `<prefix>services/<service>/<instance-id>`) and its published status (under
//! `<prefix>status/<service>/<instance-id>`), both bound to its lease.

use serde::{Deserialize, Serialize};

/// What an instance writes under its registration key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Service name, for example `pricing`.
    pub service: String,
    /// Unique id of this instance.
    pub instance_id: String,
    /// The address the instance actually bound, `host:port`.
    pub address: String,
    /// Process id, to help operators.
    pub pid: u32,
    /// Version of the binary.
    pub version: String,
}

/// What an instance publishes about itself under its status key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub instance_id: String,
    /// The configuration revision applied and the latest one rejected.
    pub config: crate::config::ConfigStatus,
}
