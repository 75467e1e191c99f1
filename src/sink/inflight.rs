//! Which publish an acknowledgement is for, by packet id.
//!
//! The link hands a publish to the MQTT client and tags it ([`Tag`]). The client's event loop assigns
//! the packet id when it writes the packet and reports it (`Outgoing::Publish(pkid)`), in the order
//! the publishes were handed over; the broker's PUBACK (QoS 1) or PUBCOMP (QoS 2) names the same id.
//! So a verdict leaves the outbox only on its own acknowledgement, whatever order the acknowledgements
//! come in. A packet id the client had to hold back because it was still in use is reported as
//! `AwaitAck(pkid)` and written later under that id.

use std::collections::{BTreeMap, VecDeque};

use crate::types::verdict::VerdictMessage;

/// What a publish carried.
#[derive(Debug, Clone, PartialEq)]
pub enum Tag {
    /// A verdict from the outbox, by key.
    Verdict(u64),
    /// A verdict held in memory while the outbox is not writable, with its place in the memory queue.
    Memory(u64, Box<VerdictMessage>),
    /// A status, state, description or reply: nothing to retire.
    Other,
}

/// Publishes handed to the client and not yet acknowledged.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Handed over, not yet written (no packet id yet), oldest first.
    handed: VecDeque<Tag>,
    /// Written, waiting for the acknowledgement with this packet id.
    written: BTreeMap<u16, Tag>,
    /// Held back by the client because its packet id was still in use.
    held: Option<(u16, Tag)>,
}

impl Inflight {
    /// A publish was handed to the client.
    pub fn handed(&mut self, tag: Tag) {
        self.handed.push_back(tag);
    }

    /// The client wrote the oldest handed publish under `pkid`. With QoS 0 (packet id 0) nothing
    /// will acknowledge it: it is done, and returned.
    pub fn written(&mut self, pkid: u16) -> Option<Tag> {
        let tag = match self.held.take() {
            Some((id, tag)) if id == pkid => tag,
            other => {
                self.held = other;
                self.handed.pop_front()?
            }
        };
        if pkid == 0 {
            return Some(tag);
        }
        if let Some(stale) = self.written.insert(pkid, tag) {
            tracing::warn!("packet id {pkid} reused before its acknowledgement; {stale:?} will be sent again");
        }
        None
    }

    /// The client held the oldest handed publish back: `pkid` is still waiting for its ack.
    pub fn held_back(&mut self, pkid: u16) {
        if let Some(tag) = self.handed.pop_front() {
            self.held = Some((pkid, tag));
        }
    }

    /// The broker acknowledged `pkid`: the publish it was for.
    pub fn acked(&mut self, pkid: u16) -> Option<Tag> {
        self.written.remove(&pkid)
    }

    /// Publishes not yet acknowledged.
    pub fn len(&self) -> usize {
        self.handed.len() + self.written.len() + usize::from(self.held.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn tags(&self) -> impl Iterator<Item = &Tag> {
        self.handed.iter().chain(self.written.values()).chain(self.held.iter().map(|(_, t)| t))
    }

    /// Verdicts not yet acknowledged.
    pub fn verdicts(&self) -> usize {
        self.tags().filter(|t| !matches!(t, Tag::Other)).count()
    }

    /// The oldest outbox verdict that went out on the wire and was not acknowledged.
    pub fn oldest_written(&self) -> Option<u64> {
        self.written.values().filter_map(|t| if let Tag::Verdict(k) = t { Some(*k) } else { None }).min()
    }

    /// Everything not acknowledged, when the connection is gone.
    pub fn take_all(&mut self) -> Vec<Tag> {
        let mut all: Vec<Tag> = self.handed.drain(..).collect();
        all.extend(std::mem::take(&mut self.written).into_values());
        all.extend(self.held.take().map(|(_, t)| t));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_retire_their_own_publish_in_any_order() {
        let mut f = Inflight::default();
        for k in [10, 11, 12] {
            f.handed(Tag::Verdict(k));
        }
        f.handed(Tag::Other);
        assert_eq!(f.written(1), None);
        assert_eq!(f.written(2), None);
        assert_eq!(f.written(3), None);
        assert_eq!(f.written(4), None);
        assert_eq!(f.oldest_written(), Some(10));
        // The broker acknowledges out of order (allowed for QoS 2 flows and by some brokers for QoS 1):
        // pairing by order would retire 10 here.
        assert_eq!(f.acked(3), Some(Tag::Verdict(12)));
        assert_eq!(f.acked(1), Some(Tag::Verdict(10)));
        assert_eq!(f.acked(9), None, "an unknown packet id retires nothing");
        assert_eq!((f.len(), f.verdicts()), (2, 1));
        assert_eq!(f.take_all(), [Tag::Verdict(11), Tag::Other]);
    }

    #[test]
    fn a_held_back_publish_keeps_its_packet_id_and_qos0_is_done_when_written() {
        let mut f = Inflight::default();
        f.handed(Tag::Verdict(1));
        f.handed(Tag::Verdict(2));
        f.held_back(5);
        f.written(6);
        assert_eq!(f.acked(6), Some(Tag::Verdict(2)));
        f.written(5);
        assert_eq!(f.acked(5), Some(Tag::Verdict(1)));
        f.handed(Tag::Verdict(3));
        assert_eq!(f.written(0), Some(Tag::Verdict(3)));
        assert!(f.is_empty());
    }
}
