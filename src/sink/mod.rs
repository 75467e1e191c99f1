//! Where verdicts go: the MQTT [`mqtt`] link (which also reads the command topic), its durable
//! [`outbox`], and the flagged-frame [`store`].

pub mod mqtt;
pub mod outbox;
pub mod store;
