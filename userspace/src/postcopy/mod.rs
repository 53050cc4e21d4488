//! Disk post-copy: the destination takes over before it holds every unit
//! of the disk; what it lacks comes from the source, on demand (a read of a
//! missing unit asks for it and waits) or by the source's background push.
//!
//! Two wings, as everywhere: the destination keeps a [`Presence`] (which
//! units are still missing, which are being filled, which were asked for)
//! and gates its NBD export and its `Read` answers on it; the source
//! ([`push`]) answers the destination's demands on a stream of their own
//! and pushes the rest in the predictor's order. A unit the destination
//! writes while it is missing becomes its own: a push that arrives later
//! for it is dropped (fills write only where a unit is still missing).
//! Why this order and what it costs: `docs/migration.md` (post-copy).

pub mod presence;
pub mod push;

pub use presence::{Presence, PresenceError, PresenceSnapshot};
pub use push::{DemandServer, PushError, PushReport};
