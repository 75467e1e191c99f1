//! Where verdicts go: the MQTT [`mqtt`] link (which also reads the command topic), the packet-id
//! bookkeeping of what it has in flight ([`inflight`]), its durable [`outbox`], its Sparkplug B mode
//! ([`sparkplug`]), the flagged-frame [`store`] and the operators' [`audit`] log.

pub mod audit;
pub mod inflight;
pub mod mqtt;
pub mod outbox;
pub mod sparkplug;
pub mod store;
