//! Helpers with no knowledge of inspection: image files and pixels ([`imageio`]), the seeded
//! random numbers every generated image comes from ([`rng`]), the poison-tolerant lock ([`sync`]) and
//! the inspection threads' priority ([`priority`]) and outside text made safe to log ([`text`]).

pub mod imageio;
pub mod priority;
pub mod rng;
pub mod sync;
pub mod text;
pub mod url;
