//! Where verdicts go: the MQTT [`mqtt`] link (which also reads the command topic), the packet-id
//! bookkeeping of what it has in flight ([`inflight`]), its durable [`outbox`], and the flagged-frame
//! [`store`].

pub mod inflight;
pub mod mqtt;
pub mod outbox;
pub mod store;
