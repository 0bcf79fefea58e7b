//! TLS termination: the policy (`policy`), certificates and SNI (`certs`), the handshake with
//! its failure classification (`accept`), forced key updates (`rekey`), and the client stream
//! handed to HTTP (`stream`, which holds HTTP/2's `first_flight` for the first response), the per-address handshake rate (`rate`) and the connection
//! age limit (`max_age`).
//! Sits between the listener (which hands us accepted TCP sockets) and `http`.

pub mod accept;
pub mod certs;
pub mod client_cert;
mod first_flight;
pub mod keylog;
pub mod max_age;
pub mod policy;
pub mod rate;
pub mod rekey;
pub mod stream;

pub use accept::{Established, TlsAcceptor, TlsInfo};
