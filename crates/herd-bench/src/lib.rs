//! herd-bench: measures what herd's own layers cost.
//!
//! - [`load`]: a load generator for herd's gRPC services — closed loop (N concurrent calls) or open
//!   loop (a fixed rate), several connections, warm-up, hdrhistogram latencies, failures by code.
//! - [`caller`]: its calls, gRPC spoken straight on HTTP/2 so that one core can offer more load
//!   than a mesh can serve.
//! - [`raw`]: the baseline — the same four services' logic served by plain tonic at fixed
//!   addresses, with none of herd's layers (no etcd, discovery, balancing, tracing or context
//!   forwarding), in the same call graph; and a hello-world server for the ceiling.
//! - [`refuse`]: an HTTP/2 server that refuses every call, on `h2` alone: the floor under what a
//!   refusal can cost.
//! - [`sink`]: an OTLP/gRPC receiver that counts and discards spans, for traced runs.
//! - [`scale`]: many simulated instances and subsetting callers in one process against a real
//!   etcd: how discovery, subsets and configuration hold as the instances grow to a thousand.

pub mod caller;
pub mod load;
pub mod raw;
pub mod refuse;
pub mod scale;
pub mod sink;
