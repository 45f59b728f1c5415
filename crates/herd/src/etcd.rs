//! Connecting to etcd with settings it tolerates.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// etcd kills connections that ping more often than every 5 s; stay above that.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long means the connection is dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on establishing a connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to the given etcd endpoints. The connection is lazy about failures: calls made while
/// etcd is away fail and can be retried on the same client.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(CONNECT_TIMEOUT);
    Client::connect(endpoints, Some(options)).await
}
