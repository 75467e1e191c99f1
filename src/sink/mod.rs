//! Where verdicts go: MQTT ([`mqtt`], with the embedded [`broker`]), the flagged-frame [`store`] and
//! the HTTP API ([`http`]: metrics, health, stored frames).

pub mod broker;
pub mod http;
pub mod mqtt;
pub mod outbox;
pub mod store;
