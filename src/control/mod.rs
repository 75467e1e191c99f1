//! What comes in to steer the daemon: the HTTP API ([`http`]: metrics, health, frames, reload,
//! trigger, chat), the PLC's [`modbus`] handshake, the OPC UA server (`opcua`) the embedded MQTT [`broker`], and the operator station's pages ([`ui`]). MQTT commands are
//! read by the link ([`crate::sink::mqtt`]).

pub mod broker;
pub mod http;
pub mod modbus;
#[cfg(feature = "opcua")]
pub mod opcua;
pub mod ui;
